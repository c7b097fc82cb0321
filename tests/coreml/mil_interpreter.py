"""A small numpy interpreter for the (stateful) MIL programs produced by our Core ML exports.

Core ML predictions cannot run on Linux, so tests execute the pymil ``Program`` directly:

    prog = load_program("model.mlpackage")        # or ct.convert(..., convert_to="milinternal")
    interp = MILInterpreter(prog, function="main")
    state = interp.new_state()                      # {"k_cache": zeros(fp16), "v_cache": ...}
    out = interp.run({"input_ids": ids, "causal_mask": mask}, state)   # mutates `state`

Ops run in block order through ``HANDLERS`` (op type -> small numpy function). Arithmetic is done
in float32; every output declared fp16 is rounded to fp16 right after its op (values are then
held in float32 containers), so the interpreter mimics an fp16 program. Integer outputs are cast
to their declared integer dtype. Constants and constexpr (compressed-weight) ops are materialised
once, at construction. Unhandled ops raise ``NotImplementedError`` naming the op type.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional

import numpy as np

from coremltools.converters.mil.mil import types
from coremltools.converters.mil.mil.types.symbolic import is_symbolic

HANDLERS: Dict[str, Callable[["_Args"], Any]] = {}


def _op(*names: str):
    def register(fn):
        for name in names:
            HANDLERS[name] = fn
        return fn

    return register


class _Args:
    """Concrete input values of one op: ``a.x`` is the value bound to input ``x`` (None if absent)."""

    def __init__(self, op, values: Dict[str, Any], states: Dict[str, np.ndarray]):
        self.op, self.states, self._values = op, states, values

    def __getattr__(self, name):
        return self._values.get(name)


def _np_dtype(var):
    """numpy dtype declared for a Var's (element) type, or None for non-numeric types."""
    try:
        return np.dtype(types.nptype_from_builtin(var.dtype))
    except Exception:
        return None


def _normalise(value, var):
    """Cast an op result to the declared dtype of its output var; fp16 values stay in float32."""
    dtype = _np_dtype(var)
    if dtype is None or isinstance(value, str):
        return value
    arr = np.asarray(value)
    if dtype == np.float16:
        return arr.astype(np.float16).astype(np.float32)
    return arr.astype(dtype)


def _axes(axes):
    return None if axes is None else tuple(int(i) for i in np.atleast_1d(axes))


def _index(shape, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    """numpy index tuple for MIL slice_by_index / slice_update arguments."""
    idx = []
    for i in range(len(shape)):
        if squeeze_mask is not None and squeeze_mask[i]:
            idx.append(int(begin[i]))  # pure index at begin[i]
            continue
        b = None if begin_mask is not None and begin_mask[i] else int(begin[i])
        e = None if end_mask is not None and end_mask[i] else int(end[i])
        idx.append(slice(b, e, 1 if stride is None else int(stride[i])))
    return tuple(idx)


def _softmax(x, axis=-1):
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


# --- state ------------------------------------------------------------------------------------
@_op("read_state")
def _read_state(a):
    return a.states[a.input].astype(np.float32).copy()


@_op("coreml_update_state")
def _update_state(a):
    buf = a.states[a.state]
    if buf.shape != a.value.shape:
        raise ValueError(f"coreml_update_state: shape {a.value.shape} != state shape {buf.shape}")
    buf[...] = a.value.astype(buf.dtype)
    return a.value


# --- slicing / indexing -----------------------------------------------------------------------
@_op("slice_by_index")
def _slice_by_index(a):
    idx = _index(a.x.shape, a.begin, a.end, a.stride, a.begin_mask, a.end_mask, a.squeeze_mask)
    return a.x[idx].copy()


@_op("slice_by_size")
def _slice_by_size(a):
    idx = tuple(
        slice(int(b), None if int(s) == -1 else int(b) + int(s)) for b, s in zip(a.begin, a.size)
    )
    return a.x[idx].copy()


@_op("slice_update")
def _slice_update(a):
    idx = _index(a.x.shape, a.begin, a.end, a.stride, a.begin_mask, a.end_mask, a.squeeze_mask)
    out = a.x.copy()
    if out[idx].shape != a.update.shape:
        raise ValueError(f"slice_update: update shape {a.update.shape} != slice shape {out[idx].shape}")
    out[idx] = a.update
    return out


@_op("gather")
def _gather(a):
    axis, bd = int(a.axis if a.axis is not None else 0), int(a.batch_dims or 0)
    x, ind = a.x, np.asarray(a.indices).astype(np.int64)
    axis = axis + x.ndim if axis < 0 else axis
    ind = np.where(ind < 0, ind + x.shape[axis], ind)  # negative indices count from the end
    if bd == 0:
        return np.take(x, ind, axis=axis)
    batch = x.shape[:bd]
    parts = [np.take(x[b], ind[b], axis=axis - bd) for b in np.ndindex(*batch)]
    return np.stack(parts).reshape(batch + parts[0].shape)


@_op("gather_along_axis")
def _gather_along_axis(a):
    ind = a.indices.astype(np.int64)
    axis = int(a.axis if a.axis is not None else 0)
    ind = np.where(ind < 0, ind + a.x.shape[axis], ind)
    return np.take_along_axis(a.x, ind, axis=axis)


@_op("band_part")
def _band_part(a):
    x, lower, upper = a.x, int(a.lower if a.lower is not None else -1), int(a.upper if a.upper is not None else -1)
    m, n = x.shape[-2:]
    d = np.arange(n)[None, :] - np.arange(m)[:, None]  # column - row
    keep = ((lower < 0) | (-d <= lower)) & ((upper < 0) | (d <= upper))
    return np.where(keep, x, 0)


# --- shape manipulation -----------------------------------------------------------------------
@_op("concat")
def _concat(a):
    vals, axis = [np.asarray(v) for v in a.values], int(a.axis)
    if any(v.ndim == 0 for v in vals):  # pymil lets scalars join rank-1 concats (shape vectors)
        vals = [np.atleast_1d(v) for v in vals]
    if not a.interleave:
        return np.concatenate(vals, axis=axis)
    axis = axis + vals[0].ndim if axis < 0 else axis
    stacked = np.stack(vals, axis=axis + 1)
    shape = list(vals[0].shape)
    shape[axis] *= len(vals)
    return stacked.reshape(shape)


@_op("stack")
def _stack(a):
    return np.stack([np.asarray(v) for v in a.values], axis=int(a.axis))


@_op("split")
def _split(a):
    axis = int(a.axis)
    if a.split_sizes is not None:
        bounds = np.cumsum(np.asarray(a.split_sizes, dtype=np.int64))[:-1]
        return tuple(np.split(a.x, bounds, axis=axis))
    return tuple(np.split(a.x, int(a.num_splits), axis=axis))


@_op("reshape")
def _reshape(a):
    shape = [int(s) for s in np.atleast_1d(a.shape)]
    for i, s in enumerate(shape):
        if s == 0:  # copy the right-aligned input dim (1 if out of range), iOS17 semantics
            j = a.x.ndim - (len(shape) - i)
            shape[i] = a.x.shape[j] if 0 <= j < a.x.ndim else 1
    return a.x.reshape(shape)


@_op("transpose")
def _transpose(a):
    return np.transpose(a.x, [int(p) for p in a.perm])


@_op("expand_dims")
def _expand_dims(a):
    return np.expand_dims(a.x, _axes(a.axes))


@_op("squeeze")
def _squeeze(a):
    return np.squeeze(a.x, axis=_axes(a.axes))


@_op("tile")
def _tile(a):
    return np.tile(a.x, [int(r) for r in np.atleast_1d(a.reps)])


@_op("shape")
def _shape(a):
    return np.array(np.shape(a.x), dtype=np.int32)


@_op("cast", "identity")
def _identity(a):  # the declared output dtype does the actual cast
    return a.x


@_op("fill")
def _fill(a):
    return np.full([int(s) for s in np.atleast_1d(a.shape)], a.value if a.value is not None else 0.0)


@_op("fill_like")
def _fill_like(a):
    return np.full(np.shape(a.ref_tensor), a.value if a.value is not None else 0.0)


@_op("range_1d")
def _range_1d(a):
    return np.arange(a.start, a.end, a.step)


# --- elementwise ------------------------------------------------------------------------------
_BINARY = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "pow": np.power,
    "maximum": np.maximum, "minimum": np.minimum, "floor_div": np.floor_divide, "mod": np.mod,
    "greater": np.greater, "greater_equal": np.greater_equal, "less": np.less,
    "less_equal": np.less_equal, "equal": np.equal, "not_equal": np.not_equal,
    "logical_and": np.logical_and, "logical_or": np.logical_or, "logical_xor": np.logical_xor,
}
for _name, _fn in _BINARY.items():
    HANDLERS[_name] = lambda a, _fn=_fn: _fn(a.x, a.y)


@_op("real_div")
def _real_div(a):  # int / int: true division, then the declared int32 output truncates
    return np.true_divide(a.x, a.y)


_UNARY = {
    "sqrt": np.sqrt, "exp": np.exp, "exp2": np.exp2, "cos": np.cos, "sin": np.sin, "tan": np.tan,
    "tanh": np.tanh, "abs": np.abs, "square": np.square, "floor": np.floor, "ceil": np.ceil,
    "round": np.round, "sign": np.sign, "logical_not": np.logical_not, "erf": np.vectorize(math.erf),
    "relu": lambda x: np.maximum(x, 0), "sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x)),
    "silu": lambda x: x / (1.0 + np.exp(-x)), "softplus": lambda x: np.logaddexp(0, x),
}
for _name, _fn in _UNARY.items():
    HANDLERS[_name] = lambda a, _fn=_fn: _fn(a.x)


def _eps(a, default):
    return default if a.epsilon is None else float(a.epsilon)


HANDLERS["rsqrt"] = lambda a: 1.0 / np.sqrt(a.x + _eps(a, 1e-12))
HANDLERS["inverse"] = lambda a: 1.0 / (a.x + _eps(a, 1e-4))
HANDLERS["log"] = lambda a: np.log(a.x + _eps(a, 1e-45))
HANDLERS["clip"] = lambda a: np.clip(a.x, a.alpha, a.beta)
HANDLERS["select"] = lambda a: np.where(a.cond, a.a, a.b)


@_op("gelu")
def _gelu(a):
    x, mode = a.x, a.mode or "EXACT"
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    if mode == "SIGMOID_APPROXIMATION":
        return x / (1 + np.exp(-1.702 * x))
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


# --- reductions / normalisation ---------------------------------------------------------------
_REDUCE = {"reduce_mean": np.mean, "reduce_sum": np.sum, "reduce_max": np.max,
           "reduce_min": np.min, "reduce_prod": np.prod,
           "reduce_sum_square": lambda x, **kw: np.sum(np.square(x), **kw),
           "reduce_l2_norm": lambda x, **kw: np.sqrt(np.sum(np.square(x), **kw))}
for _name, _fn in _REDUCE.items():
    HANDLERS[_name] = lambda a, _fn=_fn: _fn(a.x, axis=_axes(a.axes), keepdims=bool(a.keep_dims))


@_op("reduce_argmax", "reduce_argmin")
def _reduce_arg(a):
    fn = np.argmax if a.op.op_type == "reduce_argmax" else np.argmin
    axis = int(a.axis if a.axis is not None else -1)
    return fn(a.x, axis=axis, keepdims=bool(a.keep_dims))


@_op("cumsum")
def _cumsum(a):
    x, axis = a.x, int(a.axis or 0)
    if a.reverse:
        x = np.flip(x, axis)
    out = np.cumsum(x, axis=axis)
    if a.exclusive:
        out = out - x
    return np.flip(out, axis) if a.reverse else out


@_op("softmax")
def _softmax_op(a):
    return _softmax(a.x, int(a.axis if a.axis is not None else -1))


@_op("layer_norm")
def _layer_norm(a):
    axes = _axes(a.axes) or tuple(range(a.x.ndim))
    mean = a.x.mean(axis=axes, keepdims=True)
    var = ((a.x - mean) ** 2).mean(axis=axes, keepdims=True)
    out = (a.x - mean) / np.sqrt(var + _eps(a, 1e-5))
    out = out * a.gamma if a.gamma is not None else out
    return out + a.beta if a.beta is not None else out


# --- linear algebra / attention ---------------------------------------------------------------
@_op("matmul")
def _matmul(a):
    x = np.swapaxes(a.x, -1, -2) if a.transpose_x else a.x
    y = np.swapaxes(a.y, -1, -2) if a.transpose_y else a.y
    return np.matmul(x, y)


@_op("linear")
def _linear(a):
    out = np.matmul(a.x, a.weight.T)
    return out + a.bias if a.bias is not None else out


@_op("scaled_dot_product_attention")
def _sdpa(a):
    q, k, v = a.query, a.key, a.value
    scores = np.matmul(q, np.swapaxes(k, -1, -2)) / np.sqrt(q.shape[-1])
    if a.attn_mask is not None:
        mask = a.attn_mask
        scores = scores + (np.where(mask, 0.0, -np.inf) if mask.dtype == np.bool_ else mask)
    return np.matmul(_softmax(scores, -1), v)


# --- interpreter ------------------------------------------------------------------------------
class MILInterpreter:
    """Executes one function of a pymil Program with numpy. See the module docstring."""

    def __init__(self, prog, function: str = "main"):
        if function not in prog.functions:
            raise KeyError(f"function {function!r} not in program ({list(prog.functions)})")
        self.func = prog.functions[function]
        for op in self.func.operations:
            if op.blocks:
                raise NotImplementedError(f"MIL op type '{op.op_type}' (nested blocks) is not supported")
        self.state_specs: Dict[str, tuple] = {}
        self.input_vars: Dict[str, Any] = {}
        for name, var in self.func.inputs.items():
            if types.is_state(var.sym_type):
                wrapped = var.sym_type.wrapped_type()
                dtype = types.nptype_from_builtin(wrapped.get_primitive())
                self.state_specs[name] = (tuple(int(s) for s in wrapped.get_shape()), dtype)
            else:
                self.input_vars[name] = var
        self._consts: Dict[int, Any] = {}
        for op in self.func.operations:
            if op.op_type == "const":
                self._consts[id(op.outputs[0])] = _normalise(op.outputs[0].val, op.outputs[0])
            elif op.op_type.startswith("constexpr_"):
                vals = op.materialized_val_inference()
                vals = vals if isinstance(vals, tuple) else (vals,)
                for var, val in zip(op.outputs, vals):
                    self._consts[id(var)] = _normalise(val, var)

    @property
    def op_types(self) -> set:
        return {op.op_type for op in self.func.operations}

    def new_state(self) -> Dict[str, np.ndarray]:
        return {name: np.zeros(shape, dtype) for name, (shape, dtype) in self.state_specs.items()}

    def _bind_inputs(self, inputs, env):
        for name, var in self.input_vars.items():
            if name not in inputs:
                raise KeyError(f"missing input {name!r}")
            arr = np.asarray(inputs[name])
            if arr.ndim != var.rank or any(
                not is_symbolic(d) and int(d) != s for d, s in zip(var.shape, arr.shape)
            ):
                raise ValueError(f"input {name!r}: shape {arr.shape} does not fit {var.shape}")
            env[id(var)] = _normalise(arr, var)

    def run(self, inputs: Dict[str, np.ndarray], state: Optional[Dict[str, np.ndarray]] = None,
            capture: Optional[Dict[str, Any]] = None) -> Dict[str, np.ndarray]:
        """Run the function once; write ops update `state` in place. If `capture` is a dict, it
        receives every intermediate value by var name (for debugging)."""
        state = self.new_state() if state is None else state
        for name, (shape, dtype) in self.state_specs.items():
            if name not in state or state[name].shape != shape or state[name].dtype != dtype:
                raise ValueError(f"state {name!r} must be a {np.dtype(dtype)} array of shape {shape}")
        env: Dict[int, Any] = dict(self._consts)
        for name, var in self.func.inputs.items():
            if name in self.state_specs:
                env[id(var)] = name  # state inputs are bound to their key in `state`
        self._bind_inputs(inputs, env)

        def fetch(var):
            return [env[id(v)] for v in var] if isinstance(var, (list, tuple)) else env[id(var)]

        for op in self.func.operations:
            if op.op_type == "const" or op.op_type.startswith("constexpr_"):
                continue
            handler = HANDLERS.get(op.op_type)
            if handler is None:
                raise NotImplementedError(
                    f"MIL op type '{op.op_type}' (op {op.name!r}) is not supported by MILInterpreter")
            args = _Args(op, {k: fetch(v) for k, v in op.inputs.items()}, state)
            result = handler(args)
            results = result if isinstance(result, tuple) else (result,)
            if len(results) != len(op.outputs):
                raise RuntimeError(f"{op.op_type}: {len(results)} results for {len(op.outputs)} outputs")
            for var, val in zip(op.outputs, results):
                env[id(var)] = _normalise(val, var)
                if capture is not None:
                    capture[var.name] = env[id(var)]
        return {var.name: np.asarray(env[id(var)]).astype(_np_dtype(var)) for var in self.func.outputs}


def load_program(mlpackage_path, specification_version: Optional[int] = None):
    """Load the pymil Program back from a saved .mlpackage (weights included)."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load

    model = ct.models.MLModel(str(mlpackage_path), skip_model_load=True)
    spec = model.get_spec()
    return load(spec, specification_version or spec.specificationVersion, model.weights_dir or "")
