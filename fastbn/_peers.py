"""The libraries a NumPy user could pick instead of fastbn, on the same arrays: the comparisons of
``bench/`` and ``python -m fastbn``.

Each peer is a class with the methods ``fastbn.cases.Op.peer`` names (``train_forward``,
``eval_forward``, ``train_backward``; ``OPS`` lists those it has) and ``numpy(result)``, which
turns one of its outputs into a NumPy array in x's layout. A call returns only when its results
are computed (JAX dispatches asynchronously: its calls wait for their results). Each library is
imported only when its peer is made: none of them is a dependency of fastbn (``pip install -e
".[bench]"`` installs PyTorch, ``".[peers]"`` JAX, TensorFlow and ONNX Runtime).
"""
import numba
import numpy as np

TRAIN_FORWARD, EVAL_FORWARD, TRAIN_BACKWARD = "train_forward", "eval_forward", "train_backward"
LABELS = {"torch": "PyTorch", "jax": "JAX", "tensorflow": "TensorFlow",
          "onnxruntime": "ONNX Runtime"}


class Unavailable(Exception):
    """The peer cannot run here (not installed, no GPU build, or not this layout): the reason."""


def make(name, case, momentum, eps):
    """Peer ``name`` (a key of LABELS) on ``case``'s arrays; raises Unavailable."""
    if case.device == "cuda" and name != "torch":
        raise Unavailable(f"{LABELS[name]} is compared on the CPU only")
    try:
        if name == "torch":
            import torch
            if case.device == "cuda" and not torch.cuda.is_available():
                raise Unavailable("this PyTorch has no CUDA")
            from fastbn._torch import TorchBatchNorm as peer
        elif name == "jax":
            peer = JaxBatchNorm
        elif name == "tensorflow":
            peer = TensorFlowBatchNorm
        else:
            peer = OnnxRuntimeBatchNorm
        return peer(case.x, case.dy, case.gamma, case.beta, case.axis, *case.running(),
                    momentum=momentum, eps=eps)
    except ImportError as error:
        extra = "bench" if name == "torch" else "peers"
        raise Unavailable(f"{LABELS[name]} is not installed ({error.name}; pip install -e "
                          f"\".[{extra}]\")") from None


def _channel_shape(x, axis):
    """The shape that broadcasts a (C,) vector along ``axis`` of ``x``."""
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    return tuple(shape)


class JaxBatchNorm:
    """JAX (XLA on the CPU): each op one jitted function of x's layout, the statistics and the
    gradient written out as PyTorch computes them (backward from the saved mean and invstd)."""

    OPS = (TRAIN_FORWARD, EVAL_FORWARD, TRAIN_BACKWARD)

    def __init__(self, x, dy, gamma, beta, axis, running_mean, running_var, momentum, eps):
        import jax
        import jax.numpy as jnp

        if x.dtype == np.float64:  # JAX rounds float64 input to float32 unless told otherwise
            jax.config.update("jax_enable_x64", True)
        axis %= x.ndim
        reduced = tuple(i for i in range(x.ndim) if i != axis)
        shape = _channel_shape(x, axis)
        count = x.size // x.shape[axis]

        def statistics(x):
            mean = jnp.mean(x, axis=reduced)
            var = jnp.mean(jnp.square(x - mean.reshape(shape)), axis=reduced)
            return mean, var

        def normalize(x, mean, invstd, gamma, beta):
            return ((x - mean.reshape(shape)) * (invstd * gamma).reshape(shape)
                    + beta.reshape(shape))

        def train_forward(x, gamma, beta, running_mean, running_var):
            mean, var = statistics(x)
            y = normalize(x, mean, jax.lax.rsqrt(var + eps), gamma, beta)
            return (y, (1 - momentum) * running_mean + momentum * mean,
                    (1 - momentum) * running_var + momentum * var * (count / (count - 1)))

        def eval_forward(x, gamma, beta, running_mean, running_var):
            return normalize(x, running_mean, jax.lax.rsqrt(running_var + eps), gamma, beta)

        def train_backward(dy, x, gamma, mean, invstd):
            xhat = (x - mean.reshape(shape)) * invstd.reshape(shape)
            dbeta = jnp.sum(dy, axis=reduced)
            dgamma = jnp.sum(dy * xhat, axis=reduced)
            dx = (gamma * invstd).reshape(shape) * (
                dy - (dbeta / count).reshape(shape) - xhat * (dgamma / count).reshape(shape))
            return dx, dgamma, dbeta

        put = jax.device_put
        self.x, self.dy, self.gamma, self.beta = put(x), put(dy), put(gamma), put(beta)
        self.running_mean, self.running_var = put(running_mean), put(running_var)
        self._train, self._eval = jax.jit(train_forward), jax.jit(eval_forward)
        self._backward = jax.jit(train_backward)
        mean, var = jax.jit(statistics)(self.x)
        self.mean, self.invstd = mean, jax.lax.rsqrt(var + eps)

    def train_forward(self):
        y, self.running_mean, self.running_var = self._train(
            self.x, self.gamma, self.beta, self.running_mean, self.running_var)
        return y.block_until_ready()

    def eval_forward(self):
        return self._eval(self.x, self.gamma, self.beta, self.running_mean,
                          self.running_var).block_until_ready()

    def train_backward(self):
        results = self._backward(self.dy, self.x, self.gamma, self.mean, self.invstd)
        return tuple(r.block_until_ready() for r in results)

    @staticmethod
    def numpy(result):
        return np.asarray(result)


def _tensorflow_threads(tf):
    """TensorFlow on as many threads as Numba, where it has not started yet."""
    threads = numba.get_num_threads()
    if tf.config.threading.get_intra_op_parallelism_threads() != threads:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:  # TensorFlow has already started: it keeps its thread count
            pass


class TensorFlowBatchNorm:
    """TensorFlow's fused batch norm (``FusedBatchNormV3`` and its gradient, oneDNN kernels on
    x86), in ``tf.function`` graphs. N×D runs as N×1×1×D channels-last, N×C×L as N×C×L×1; the
    reshapes are free views in the graph, and results come back in x's shape."""

    OPS = (TRAIN_FORWARD, EVAL_FORWARD, TRAIN_BACKWARD)

    def __init__(self, x, dy, gamma, beta, axis, running_mean, running_var, momentum, eps):
        if x.dtype != np.float32:
            raise Unavailable("TensorFlow's fused batch norm takes float16, bfloat16 and float32 "
                              "only")
        import tensorflow as tf

        _tensorflow_threads(tf)
        axis %= x.ndim
        shape = x.shape
        if x.ndim == 2:
            fused, data_format = (shape[0], 1, 1, shape[1]), "NHWC"
        elif x.ndim == 3 and axis == 1:
            fused, data_format = (*shape, 1), "NCHW"
        elif x.ndim in (4, 5) and axis in (1, x.ndim - 1):
            fused = shape
            data_format = ("NCHW" if axis == 1 else "NHWC") if x.ndim == 4 else (
                "NCDHW" if axis == 1 else "NDHWC")
        else:
            raise Unavailable(f"TensorFlow's fused batch norm takes no {x.ndim}-D input with "
                              f"channel axis {axis}")

        def as_fused(t):
            return tf.reshape(t, fused)

        def as_x(t):
            return tf.reshape(t, shape)

        constant = tf.constant

        @tf.function
        def train_forward(x, gamma, beta, running_mean, running_var):
            y, mean, var, *_ = tf.raw_ops.FusedBatchNormV3(
                x=as_fused(x), scale=gamma, offset=beta, mean=running_mean,
                variance=running_var, epsilon=eps, exponential_avg_factor=momentum,
                data_format=data_format, is_training=True)
            return as_x(y), mean, var

        @tf.function
        def eval_forward(x, gamma, beta, running_mean, running_var):
            y = tf.raw_ops.FusedBatchNormV3(
                x=as_fused(x), scale=gamma, offset=beta, mean=running_mean,
                variance=running_var, epsilon=eps, data_format=data_format,
                is_training=False)[0]
            return as_x(y)

        @tf.function
        def saved(x, gamma, beta):
            empty = tf.zeros([0], x.dtype)
            return tf.raw_ops.FusedBatchNormV3(
                x=as_fused(x), scale=gamma, offset=beta, mean=empty, variance=empty,
                epsilon=eps, data_format=data_format, is_training=True)[3:]

        @tf.function
        def train_backward(dy, x, gamma, reserve_1, reserve_2, reserve_3):
            dx, dgamma, dbeta, *_ = tf.raw_ops.FusedBatchNormGradV3(
                y_backprop=as_fused(dy), x=as_fused(x), scale=gamma, reserve_space_1=reserve_1,
                reserve_space_2=reserve_2, reserve_space_3=reserve_3, epsilon=eps,
                data_format=data_format, is_training=True)
            return as_x(dx), dgamma, dbeta

        self.x, self.dy = constant(x), constant(dy)
        self.gamma, self.beta = constant(gamma), constant(beta)
        self.running_mean, self.running_var = constant(running_mean), constant(running_var)
        self._train, self._eval, self._backward = train_forward, eval_forward, train_backward
        self._reserve = saved(self.x, self.gamma, self.beta)

    def train_forward(self):
        y, self.running_mean, self.running_var = self._train(
            self.x, self.gamma, self.beta, self.running_mean, self.running_var)
        return y

    def eval_forward(self):
        return self._eval(self.x, self.gamma, self.beta, self.running_mean, self.running_var)

    def train_backward(self):
        return self._backward(self.dy, self.x, self.gamma, *self._reserve)

    @staticmethod
    def numpy(result):
        return result.numpy()


class OnnxRuntimeBatchNorm:
    """ONNX Runtime's ``BatchNormalization`` (an inference runtime: eval forward only), on inputs
    whose channel axis is 1, as ONNX lays them out."""

    OPS = (EVAL_FORWARD,)

    def __init__(self, x, dy, gamma, beta, axis, running_mean, running_var, momentum, eps):
        import onnx
        import onnxruntime
        from onnx import TensorProto, helper

        if axis % x.ndim != 1:
            raise Unavailable("ONNX's BatchNormalization takes the channel axis at 1 only")
        element = TensorProto.FLOAT if x.dtype == np.float32 else TensorProto.DOUBLE
        channels = x.shape[1]
        inputs = [helper.make_tensor_value_info("x", element, list(x.shape))] + [
            helper.make_tensor_value_info(name, element, [channels])
            for name in ("gamma", "beta", "mean", "var")]
        graph = helper.make_graph(
            [helper.make_node("BatchNormalization", ["x", "gamma", "beta", "mean", "var"], ["y"],
                              epsilon=eps)],
            "batch_norm", inputs, [helper.make_tensor_value_info("y", element, list(x.shape))])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
        onnx.checker.check_model(model)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = numba.get_num_threads()
        options.inter_op_num_threads = 1
        self._session = onnxruntime.InferenceSession(model.SerializeToString(), options,
                                                     providers=["CPUExecutionProvider"])
        self._feed = {"x": x, "gamma": gamma, "beta": beta, "mean": running_mean,
                      "var": running_var}

    def eval_forward(self):
        return self._session.run(None, self._feed)[0]

    @staticmethod
    def numpy(result):
        return result


# -- the normalization family: layer, group, instance and RMS norm ------------------------------
#
# Each peer runs one op of the family (a ``fastbn.cases.Norm``) on a ``fastbn.cases.NormCase``'s
# arrays: ``forward()`` returns y, ``backward()`` the gradients (dx, dgamma, dbeta; RMS norm has
# no dbeta) given the statistics of a forward run once when the peer is made, and
# ``numpy(result)`` one of them as a NumPy array. ``OPS`` lists the calls a peer has.

FORWARD, BACKWARD = "forward", "backward"


def make_norm(name, case, eps):
    """Peer ``name`` (a key of LABELS) running ``case.norm`` on ``case``'s arrays (a
    ``fastbn.cases.NormCase``); raises Unavailable."""
    peer = {"torch": TorchNorm, "jax": JaxNorm, "tensorflow": TensorFlowNorm,
            "onnxruntime": OnnxRuntimeNorm}[name]
    try:
        return peer(case.norm, case.x, case.dy, case.gamma, case.beta, eps)
    except ImportError as error:
        extra = "bench" if name == "torch" else "peers"
        raise Unavailable(f"{LABELS[name]} is not installed ({error.name}; pip install -e "
                          f"\".[{extra}]\")") from None


class TorchNorm:
    """PyTorch's eager ops on zero-copy views of the arrays, on as many threads as Numba.

    Forward: ``torch.nn.functional``'s ``layer_norm``, ``group_norm``, ``instance_norm``,
    ``rms_norm``. Backward: layer and group norm's ATen gradient ops, which autograd calls
    (``native_layer_norm_backward``, ``native_group_norm_backward``), without autograd's
    bookkeeping; instance and RMS norm have none of their own (``instance_norm`` runs as batch
    norm on 1×(N·C)×spatial, ``rms_norm`` as elementwise ops), so their backward is autograd's
    on a graph kept from one forward (``torch.autograd.grad(..., retain_graph=True)``).
    """

    OPS = (FORWARD, BACKWARD)

    def __init__(self, norm, x, dy, gamma, beta, eps):
        import torch
        import torch.nn.functional as F

        torch.set_num_threads(numba.get_num_threads())
        aten = torch.ops.aten
        tx, tdy, tgamma = torch.from_numpy(x), torch.from_numpy(dy), torch.from_numpy(gamma)
        tbeta = None if beta is None else torch.from_numpy(beta)
        normalized = list(x.shape[-1:])
        if norm.function == "layer_norm":
            self._forward = lambda: F.layer_norm(tx, normalized, tgamma, tbeta, eps)
            _, mean, rstd = aten.native_layer_norm(tx, normalized, tgamma, tbeta, eps)
            self._backward = lambda: aten.native_layer_norm_backward(
                tdy, tx, normalized, mean, rstd, tgamma, tbeta, [True] * 3)
        elif norm.function == "group_norm":
            n, c, spatial, groups = x.shape[0], x.shape[1], int(np.prod(x.shape[2:])), norm.groups
            self._forward = lambda: F.group_norm(tx, groups, tgamma, tbeta, eps)
            _, mean, rstd = aten.native_group_norm(tx, tgamma, tbeta, n, c, spatial, groups, eps)
            self._backward = lambda: aten.native_group_norm_backward(
                tdy, tx, mean, rstd, tgamma, n, c, spatial, groups, [True] * 3)
        else:
            if norm.function == "instance_norm":
                def forward(x, gamma, beta):
                    return F.instance_norm(x, weight=gamma, bias=beta, eps=eps)
            else:
                def forward(x, gamma, beta):
                    return F.rms_norm(x, normalized, gamma, eps)
            self._forward = lambda: forward(tx, tgamma, tbeta)
            # Leaves of their own (sharing the arrays' memory) for the graph autograd keeps.
            leaves = [torch.from_numpy(a).requires_grad_()
                      for a in (x, gamma, beta) if a is not None]
            y = forward(*leaves, *([None] if beta is None else []))
            self._backward = lambda: torch.autograd.grad(y, leaves, tdy, retain_graph=True)

    def forward(self):
        return self._forward()

    def backward(self):
        return tuple(self._backward())

    @staticmethod
    def numpy(result):
        return result.detach().numpy()


def _norm_shapes(norm, x):
    """``(view, parameters)``: x's shape as ``(rows, groups, P, S)``, and the shape that
    broadcasts gamma and beta over it."""
    view = norm.view(x.shape)
    return view, (1, view[1], view[2], 1)


class JaxNorm:
    """JAX (XLA on the CPU): forward and backward each one jitted function, written from jnp ops
    on x seen as ``(rows, groups, P, S)`` (statistics over the last two axes), the backward
    from the saved statistics as PyTorch's is (not autodiff, which would redo the forward)."""

    OPS = (FORWARD, BACKWARD)

    def __init__(self, norm, x, dy, gamma, beta, eps):
        import jax
        import jax.numpy as jnp

        if x.dtype == np.float64:  # JAX rounds float64 input to float32 unless told otherwise
            jax.config.update("jax_enable_x64", True)
        shape, (view, parameters) = x.shape, _norm_shapes(norm, x)
        axes, centred = (2, 3), norm.centred

        def statistics(x):
            x = x.reshape(view)
            if not centred:
                return None, jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=axes, keepdims=True)
                                           + eps)
            mean = jnp.mean(x, axis=axes, keepdims=True)
            var = jnp.mean(jnp.square(x - mean), axis=axes, keepdims=True)
            return mean, jax.lax.rsqrt(var + eps)

        def normalized(x, mean, invstd):
            return (x - mean) * invstd if centred else x * invstd

        def forward(x, gamma, beta):
            y = normalized(x.reshape(view), *statistics(x)) * gamma.reshape(parameters)
            if centred:
                y = y + beta.reshape(parameters)
            return y.reshape(shape)

        def backward(dy, x, gamma, mean, invstd):
            dy = dy.reshape(view)
            xhat = normalized(x.reshape(view), mean, invstd)
            g = dy * gamma.reshape(parameters)
            dgamma = jnp.sum(dy * xhat, axis=(0, 3)).reshape(gamma.shape)
            dx = g - xhat * jnp.mean(g * xhat, axis=axes, keepdims=True)
            if not centred:
                return (invstd * dx).reshape(shape), dgamma
            dx = dx - jnp.mean(g, axis=axes, keepdims=True)
            return ((invstd * dx).reshape(shape), dgamma,
                    jnp.sum(dy, axis=(0, 3)).reshape(gamma.shape))

        put = jax.device_put
        self.x, self.dy, self.gamma = put(x), put(dy), put(gamma)
        self.beta = None if beta is None else put(beta)
        self._forward, self._backward = jax.jit(forward), jax.jit(backward)
        self.mean, self.invstd = jax.jit(statistics)(self.x)

    def forward(self):
        return self._forward(self.x, self.gamma, self.beta).block_until_ready()

    def backward(self):
        results = self._backward(self.dy, self.x, self.gamma, self.mean, self.invstd)
        return tuple(r.block_until_ready() for r in results)

    @staticmethod
    def numpy(result):
        return np.asarray(result)


class TensorFlowNorm:
    """TensorFlow: the same formulas as :class:`JaxNorm` from TensorFlow's ops, in
    ``tf.function`` graphs (TensorFlow has no fused kernel for these norms: Keras's
    ``LayerNormalization`` and ``GroupNormalization`` are ops like these)."""

    OPS = (FORWARD, BACKWARD)

    def __init__(self, norm, x, dy, gamma, beta, eps):
        import tensorflow as tf

        _tensorflow_threads(tf)
        shape, (view, parameters) = x.shape, _norm_shapes(norm, x)
        axes, centred = [2, 3], norm.centred

        def statistics(x):
            x = tf.reshape(x, view)
            if not centred:
                square = tf.reduce_mean(tf.square(x), axis=axes, keepdims=True)
                return (tf.math.rsqrt(square + eps),)
            mean = tf.reduce_mean(x, axis=axes, keepdims=True)
            var = tf.reduce_mean(tf.square(x - mean), axis=axes, keepdims=True)
            return tf.math.rsqrt(var + eps), mean

        def normalized(x, invstd, mean=None):
            return (x - mean) * invstd if centred else x * invstd

        @tf.function
        def forward(x, gamma, *beta):
            y = normalized(tf.reshape(x, view), *statistics(x)) * tf.reshape(gamma, parameters)
            if centred:
                y = y + tf.reshape(beta[0], parameters)
            return tf.reshape(y, shape)

        @tf.function
        def backward(dy, x, gamma, invstd, *mean):
            dy = tf.reshape(dy, view)
            xhat = normalized(tf.reshape(x, view), invstd, *mean)
            g = dy * tf.reshape(gamma, parameters)
            dgamma = tf.reshape(tf.reduce_sum(dy * xhat, axis=[0, 3]), gamma.shape)
            dx = g - xhat * tf.reduce_mean(g * xhat, axis=axes, keepdims=True)
            if not centred:
                return tf.reshape(invstd * dx, shape), dgamma
            dx = dx - tf.reduce_mean(g, axis=axes, keepdims=True)
            return (tf.reshape(invstd * dx, shape), dgamma,
                    tf.reshape(tf.reduce_sum(dy, axis=[0, 3]), gamma.shape))

        constant = tf.constant
        self.x, self.dy, self.gamma = constant(x), constant(dy), constant(gamma)
        self.beta = () if beta is None else (constant(beta),)
        self._forward, self._backward = forward, backward
        self._statistics = tf.function(statistics)(self.x)  # (invstd, mean) or (invstd,)

    def forward(self):
        return self._forward(self.x, self.gamma, *self.beta)

    def backward(self):
        return tuple(self._backward(self.dy, self.x, self.gamma, *self._statistics))

    @staticmethod
    def numpy(result):
        return result.numpy()


# Each op's ONNX operator, and the opset that has it as the family computes it.
_ONNX_NORMS = {"layer_norm": ("LayerNormalization", 17), "rms_norm": ("RMSNormalization", 23),
               "group_norm": ("GroupNormalization", 21),
               "instance_norm": ("InstanceNormalization", 15)}


class OnnxRuntimeNorm:
    """ONNX Runtime (an inference runtime: forward only): a model of the op's own ONNX operator,
    ``LayerNormalization`` (opset 17), ``GroupNormalization`` (21: per-channel scale),
    ``InstanceNormalization`` or ``RMSNormalization`` (23), in an inference session."""

    OPS = (FORWARD,)

    def __init__(self, norm, x, dy, gamma, beta, eps):
        import onnx
        import onnxruntime
        from onnx import TensorProto, helper

        operator, opset = _ONNX_NORMS[norm.function]
        attributes = {"epsilon": eps}
        if norm.function in ("layer_norm", "rms_norm"):
            attributes["axis"] = -1
        elif norm.function == "group_norm":
            attributes["num_groups"] = norm.groups
        element = TensorProto.FLOAT if x.dtype == np.float32 else TensorProto.DOUBLE
        self._feed = {"x": x, "scale": gamma, **({} if beta is None else {"bias": beta})}
        inputs = [helper.make_tensor_value_info(name, element, list(a.shape))
                  for name, a in self._feed.items()]
        graph = helper.make_graph(
            [helper.make_node(operator, list(self._feed), ["y"], **attributes)], operator,
            inputs, [helper.make_tensor_value_info("y", element, list(x.shape))])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        onnx.checker.check_model(model)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = numba.get_num_threads()
        options.inter_op_num_threads = 1
        try:
            self._session = onnxruntime.InferenceSession(model.SerializeToString(), options,
                                                         providers=["CPUExecutionProvider"])
        except Exception as error:  # e.g. no kernel for this operator and dtype
            raise Unavailable(f"ONNX Runtime cannot run {operator} on {x.dtype}: {error}") \
                from None

    def forward(self):
        return self._session.run(None, self._feed)[0]

    @staticmethod
    def numpy(result):
        return result
