"""Keras optimizers that keep pruned weights exactly zero, inside the compiled train step.

Two kinds of wrapper, each a subclass of the wrapped optimizer's own class:

- fixed masks (`fixed_mask_optimizer`, the lottery stage's retraining): masks are constants
  captured by the compiled step. Gradients of pruned weights are zeroed before the update and the
  weights again after it, except for the optimizers whose update is exactly zero wherever the
  gradient and the state are zero (zero_preserving_optimizers()): a fixed mask never grows, so
  their state is zero at every pruned position and the second multiply is skipped.
- growing masks (`gmp_optimizer_class`, gradual magnitude pruning in dense training): each
  prunable kernel gets a mask *variable* among the optimizer's variables (initially all ones),
  which the pruning schedule (`train.gmp`) assigns between steps. So the masks travel with the
  optimizer state: into every checkpoint and resume file, into each Elephas round and through its
  averaging (every worker holds the same 0/1 mask, and the record-weighted float64 average of
  equal values is that value exactly). A weight pruned by a growing mask still carries momentum
  or Adam moments from when it was alive, so here the weight is always re-zeroed after the update,
  whatever the optimizer. The masking sits in `update_step`, which Keras calls per variable inside
  the distribution strategy's update context (MirroredStrategy, MultiWorkerMirroredStrategy). A
  step that loss scaling skips (non-finite gradients) never reaches update_step: weights, masks
  and slots are left as they were.
"""
from __future__ import annotations

import contextlib
import fnmatch
from typing import Any, Iterator, Mapping

# Kernel variable names that gradual pruning masks (BatchNorm, biases and embeddings never;
# depthwise kernels only when asked: few weights, each one a whole spatial filter).
GMP_KERNELS = ("kernel", "pointwise_kernel")
DEPTHWISE_KERNEL = "depthwise_kernel"


def _keras():
    import keras

    return keras


def zero_preserving_optimizers() -> tuple[type, ...]:
    """Keras optimizer classes (exactly these, not subclasses) whose update is zero wherever the
    gradient and the optimizer state are zero, weight decay and momentum included."""
    opts = _keras().optimizers
    return (opts.SGD, opts.Adam, opts.AdamW, opts.Adamax, opts.Nadam, opts.RMSprop, opts.Adagrad,
            opts.Adadelta, opts.Lion)


# ------------------------------------------------------------------------------------ fixed masks
class _MaskedOptimizerMixin:
    """Mixed in front of a Keras optimizer class: masks gradients before, weights after the update
    (the latter only where the class can move a weight whose gradient is zero)."""

    _bt_masks: dict[str, Any]
    _bt_mask_weights: bool = True

    def apply(self, grads, trainable_variables=None):
        ops = _keras().ops
        variables = list(self._trainable_variables if trainable_variables is None else trainable_variables)
        # A multiply by a 0/1 mask of the variable's dtype is one fused op per tensor; select with a
        # fresh zeros tensor cost twice that, which showed on small, fast models.
        masked_grads = []
        for grad, var in zip(grads, variables):
            m = self._bt_masks.get(var.path)
            masked_grads.append(grad if grad is None or m is None else grad * ops.cast(m, grad.dtype))
        super().apply(masked_grads, trainable_variables)
        if not self._bt_mask_weights:
            return
        for var in variables:
            m = self._bt_masks.get(var.path)
            if m is not None:
                var.assign(var.value * ops.cast(m, var.dtype))


_MASKED_CLASSES: dict[type, type] = {}


def base_class(cls: type) -> type:
    """The plain Keras optimizer class under any of this module's wrappers."""
    while issubclass(cls, (_MaskedOptimizerMixin, _GmpMixin)):
        cls = cls.__bases__[1]
    return cls


def fixed_mask_optimizer(base, masks_by_path: Mapping[str, Any]):
    """A fresh optimizer of `base`'s class and config honouring constant masks (variable path ->
    0/1 tensor of the variable's dtype)."""
    cls = base_class(type(base))
    if cls not in _MASKED_CLASSES:
        _MASKED_CLASSES[cls] = type(f"Masked{cls.__name__}", (_MaskedOptimizerMixin, cls),
                                    {"_bt_mask_weights": cls not in zero_preserving_optimizers()})
    config = base.get_config()
    for key in ("gmp_exclude", "gmp_prune_depthwise"):
        config.pop(key, None)
    wrapped = _MASKED_CLASSES[cls].from_config(config)
    wrapped._bt_masks = dict(masks_by_path)
    return wrapped


# ---------------------------------------------------------------------------------- growing masks
def gmp_prunable(path: str, name: str, exclude=(), prune_depthwise: bool = False) -> bool:
    """Whether gradual pruning masks the variable `path` (its last component `name`): a kernel,
    not matched by any `exclude` pattern (fnmatch on the path or on the layer name)."""
    if name not in GMP_KERNELS and not (prune_depthwise and name == DEPTHWISE_KERNEL):
        return False
    parts = path.split("/")
    layer = parts[-2] if len(parts) >= 2 else parts[0]
    return not any(fnmatch.fnmatchcase(path, p) or fnmatch.fnmatchcase(layer, p) for p in exclude)


class _GmpMixin:
    """Mixed in front of a Keras optimizer class: one mask variable per prunable kernel."""

    def __init__(self, *args, gmp_exclude=(), gmp_prune_depthwise=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.gmp_exclude = tuple(gmp_exclude)
        self.gmp_prune_depthwise = bool(gmp_prune_depthwise)
        self._gmp_masks: list = []

    def get_config(self):
        return {**super().get_config(), "gmp_exclude": list(self.gmp_exclude),
                "gmp_prune_depthwise": self.gmp_prune_depthwise}

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        masks = []
        for var in variables:
            if gmp_prunable(var.path, var.name, self.gmp_exclude, self.gmp_prune_depthwise):
                masks.append(self.add_variable_from_reference(var, name="gmp_mask", initializer="ones"))
            else:
                masks.append(None)
        self._gmp_masks = masks

    def gmp_masks(self) -> dict[str, tuple[Any, Any]]:
        """variable path -> (the model variable, its mask variable), in model order."""
        return {var.path: (var, mask) for var, mask in zip(self._trainable_variables, self._gmp_masks)
                if mask is not None}

    def update_step(self, gradient, variable, learning_rate):
        mask = self._gmp_masks[self._get_variable_index(variable)]
        if mask is None:
            return super().update_step(gradient, variable, learning_rate)
        ops = _keras().ops
        super().update_step(gradient * ops.cast(mask, gradient.dtype), variable, learning_rate)
        # Always: momentum or moments from before the weight was pruned would move it again.
        self.assign(variable, variable * ops.cast(mask, variable.dtype))


_GMP_CLASSES: dict[type, type] = {}


def gmp_optimizer_class(cls: type) -> type:
    """`Gmp<Name>`, the growing-mask wrapper of a Keras optimizer class, registered with Keras'
    serialisation (package "bigticket") so a saved model.keras names a class Keras can find."""
    cls = base_class(cls)
    if cls not in _GMP_CLASSES:
        wrapped = type(f"Gmp{cls.__name__}", (_GmpMixin, cls), {})
        _GMP_CLASSES[cls] = _keras().saving.register_keras_serializable(package="bigticket")(wrapped)
    return _GMP_CLASSES[cls]


def gmp_optimizer(base, exclude=(), prune_depthwise: bool = False):
    """A fresh growing-mask optimizer of `base`'s class and config."""
    config = {**base.get_config(), "gmp_exclude": list(exclude), "gmp_prune_depthwise": prune_depthwise}
    return gmp_optimizer_class(type(base)).from_config(config)


def gmp_inner(optimizer):
    """The growing-mask optimizer inside `optimizer` (a LossScaleOptimizer wraps it), or None."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    return inner if isinstance(inner, _GmpMixin) else None


@contextlib.contextmanager
def as_plain_optimizer(optimizer) -> Iterator[None]:
    """Inside the block the growing-mask optimizer in `optimizer` (if any) is its plain Keras class
    with only that class's variables, so a model.keras saved there names Keras classes only and
    loads anywhere (`safe_mode=True`, no import of this module) with the optimizer's own slots.
    The masks are not in it; the run's checkpoints hold them."""
    inner = gmp_inner(optimizer)
    if inner is None:
        yield
        return
    cls, variables = type(inner), inner._variables
    masks = {id(m) for m in inner._gmp_masks if m is not None}
    inner.__class__ = base_class(cls)
    inner._variables = [v for v in variables if id(v) not in masks]
    try:
        yield
    finally:
        inner.__class__, inner._variables = cls, variables
