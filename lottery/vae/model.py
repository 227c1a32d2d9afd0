"""A variational autoencoder of Dense layers: the model of the VAE neuron-pruning study.

- Encoder: pixels (flattened, in [0, 1]) -> hidden Dense layers -> `z_mean`, `z_log_var`.
- Decoder: z -> hidden Dense layers -> `pixel_logits` (one logit per pixel; sigmoid gives pixels).
- `Sampling`, a registered custom layer (no Lambda, so `.keras` files load with safe_mode), draws
  z = mean + exp(log_var / 2) * eps (the reparameterisation trick).
- The loss is split into its two terms, per example: `reconstruction` (binary cross-entropy summed
  over pixels) and `kl` (KL(q(z|x) || N(0, I)) summed over latent units); total = the sum.

Hidden layers are named `enc_hidden_<i>` / `dec_hidden_<i>`; `lottery.vae.study` prunes exactly
those (never the latent or the pixel layers), so their names are part of this module's contract.
Training uses Keras `fit` with a custom `train_step` (TensorFlow backend, as the rest of bigticket);
evaluation draws its noise from a seeded NumPy generator, so two models with the same latent size
are compared on exactly the same samples.
"""
from __future__ import annotations

import logging
import re
import time
from typing import Sequence

import keras
import numpy as np
from keras import layers, ops
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

ENCODER_HIDDEN = "enc_hidden_{}"
DECODER_HIDDEN = "dec_hidden_{}"
_HIDDEN = re.compile(r"^(?:enc|dec)_hidden_(\d+)$")
# Pruning replaces neurons by nothing; that equals zeroing them only when activation(0) == 0.
ACTIVATIONS = ("relu", "elu", "tanh", "gelu", "swish")


def reparameterise(mean, log_var, eps):
    return mean + ops.exp(0.5 * log_var) * eps


@keras.saving.register_keras_serializable(package="bigticket")
class Sampling(layers.Layer):
    """z ~ N(mean, exp(log_var)) as a differentiable function of (mean, log_var) and N(0, I) noise."""

    def __init__(self, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs):
        mean, log_var = inputs
        eps = keras.random.normal(ops.shape(mean), seed=self.seed_generator)
        return reparameterise(mean, log_var, eps)

    def get_config(self):
        return {**super().get_config(), "seed": self.seed}


def loss_terms(x, logits, mean, log_var):
    """Per-example (reconstruction, kl): BCE summed over pixels, KL summed over latent units."""
    reconstruction = ops.sum(ops.binary_crossentropy(x, logits, from_logits=True), axis=-1)
    kl = -0.5 * ops.sum(1.0 + log_var - ops.square(mean) - ops.exp(log_var), axis=-1)
    return reconstruction, kl


@keras.saving.register_keras_serializable(package="bigticket")
class VAE(keras.Model):
    """Encoder and decoder (functional models) trained together on the split loss."""

    def __init__(self, encoder: keras.Model, decoder: keras.Model, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.encoder = encoder
        self.decoder = decoder
        self.seed = seed
        self.sampling = Sampling(seed, name="sampling")
        self.total_tracker = keras.metrics.Mean(name="loss")
        self.reconstruction_tracker = keras.metrics.Mean(name="reconstruction")
        self.kl_tracker = keras.metrics.Mean(name="kl")
        # Encoder and decoder are functional models, built on construction: so is the whole.
        self.built = True

    @property
    def metrics(self):
        # Listed here so that Keras resets them at the start of every epoch.
        return [self.total_tracker, self.reconstruction_tracker, self.kl_tracker]

    def call(self, x, training=False):
        """The deterministic reconstruction (pixel probabilities decoded from z_mean)."""
        mean, _ = self.encoder(x, training=training)
        return ops.sigmoid(self.decoder(mean, training=training))

    def _step_losses(self, x, training):
        mean, log_var = self.encoder(x, training=training)
        z = self.sampling([mean, log_var])
        reconstruction, kl = loss_terms(x, self.decoder(z, training=training), mean, log_var)
        return ops.mean(reconstruction), ops.mean(kl)

    def _record(self, reconstruction, kl):
        self.reconstruction_tracker.update_state(reconstruction)
        self.kl_tracker.update_state(kl)
        self.total_tracker.update_state(reconstruction + kl)
        return {m.name: m.result() for m in self.metrics}

    def train_step(self, data):
        import tensorflow as tf

        x = data[0] if isinstance(data, (tuple, list)) else data
        with tf.GradientTape() as tape:
            reconstruction, kl = self._step_losses(x, training=True)
            total = reconstruction + kl
        grads = tape.gradient(total, self.trainable_weights)
        self.optimizer.apply_gradients(zip(grads, self.trainable_weights))
        return self._record(reconstruction, kl)

    def test_step(self, data):
        x = data[0] if isinstance(data, (tuple, list)) else data
        return self._record(*self._step_losses(x, training=False))

    def count_params(self) -> int:
        return int(self.encoder.count_params() + self.decoder.count_params())

    @property
    def hidden_widths(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(encoder hidden widths, decoder hidden widths)."""
        return (tuple(layer.units for layer in hidden_layers(self.encoder)),
                tuple(layer.units for layer in hidden_layers(self.decoder)))

    def get_config(self):
        return {**super().get_config(), "seed": self.seed,
                "encoder": keras.saving.serialize_keras_object(self.encoder),
                "decoder": keras.saving.serialize_keras_object(self.decoder)}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        encoder = keras.saving.deserialize_keras_object(config.pop("encoder"))
        decoder = keras.saving.deserialize_keras_object(config.pop("decoder"))
        return cls(encoder, decoder, **config)


def hidden_layers(model: keras.Model) -> list[layers.Dense]:
    """The prunable hidden Dense layers of an encoder or decoder, input side first."""
    found = [layer for layer in model.layers
             if isinstance(layer, layers.Dense) and _HIDDEN.match(layer.name)]
    return sorted(found, key=lambda layer: int(_HIDDEN.match(layer.name).group(1)))


def build_vae(input_dim: int, encoder_hidden: Sequence[int], decoder_hidden: Sequence[int],
              latent_dim: int, activation: str = "relu", seed: int | None = None) -> VAE:
    """A VAE with the given hidden widths (input side first in both halves)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    for name, value in (("input_dim", input_dim), ("latent_dim", latent_dim),
                        *((f"encoder_hidden[{i}]", w) for i, w in enumerate(encoder_hidden)),
                        *((f"decoder_hidden[{i}]", w) for i, w in enumerate(decoder_hidden))):
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    pixels = keras.Input((input_dim,), name="pixels")
    h = pixels
    for i, width in enumerate(encoder_hidden):
        h = layers.Dense(int(width), activation=activation, name=ENCODER_HIDDEN.format(i))(h)
    mean = layers.Dense(latent_dim, name="z_mean")(h)
    log_var = layers.Dense(latent_dim, name="z_log_var")(h)
    encoder = keras.Model(pixels, [mean, log_var], name="encoder")

    z = keras.Input((latent_dim,), name="z")
    h = z
    for i, width in enumerate(decoder_hidden):
        h = layers.Dense(int(width), activation=activation, name=DECODER_HIDDEN.format(i))(h)
    logits = layers.Dense(input_dim, name="pixel_logits")(h)
    decoder = keras.Model(z, logits, name="decoder")
    return VAE(encoder, decoder, seed=seed, name="vae")


class _EpochLog(keras.callbacks.Callback):
    """One log line and a tqdm tick per epoch (fit's own bar is per batch and noisy in logs)."""

    def __init__(self, epochs: int, what: str):
        super().__init__()
        self.bar = tqdm(total=epochs, desc=what, unit="epoch", leave=False)
        self.what = what

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        self.bar.update(1)
        log.info("%s epoch %d: loss %.4f (reconstruction %.4f, kl %.4f)", self.what, epoch + 1,
                 logs.get("loss", float("nan")), logs.get("reconstruction", float("nan")),
                 logs.get("kl", float("nan")))

    def on_train_end(self, logs=None):
        self.bar.close()


def train_vae(vae: VAE, x: np.ndarray, *, epochs: int, batch_size: int, lr: float,
              what: str = "vae") -> dict:
    """Fit `vae` on pixels `x` (N, D) with a fresh Adam optimizer; returns {seconds, history}.

    Call keras.utils.set_random_seed first for a reproducible shuffle and sampling noise.
    """
    # No XLA: compiling costs seconds per model, more than these small Dense stacks ever save.
    vae.compile(optimizer=keras.optimizers.Adam(learning_rate=lr), jit_compile=False)
    start = time.perf_counter()
    history = vae.fit(x, batch_size=batch_size, epochs=epochs, shuffle=True, verbose=0,
                      callbacks=[_EpochLog(epochs, what)]) if epochs > 0 else None
    seconds = time.perf_counter() - start
    rows = []
    if history is not None:
        for epoch in range(epochs):
            rows.append({k: float(v[epoch]) for k, v in history.history.items()})
    return {"seconds": seconds, "history": rows}


def evaluation_noise(n: int, latent_dim: int, seed: int) -> np.ndarray:
    """The N(0, I) draws evaluation uses: the same for every model of this latent size and seed."""
    return np.random.default_rng(seed).standard_normal((n, latent_dim)).astype("float32")


def evaluate_vae(vae: VAE, x: np.ndarray, *, seed: int, batch_size: int = 1024) -> dict:
    """Mean reconstruction, KL and total loss over `x`, with seeded sampling noise, and the time."""
    if len(x) == 0:
        raise ValueError("evaluate_vae: no examples to evaluate")
    latent_dim = vae.encoder.output[0].shape[-1]
    noise = evaluation_noise(len(x), latent_dim, seed)
    start = time.perf_counter()
    sums = np.zeros(2, dtype=np.float64)
    for lo in range(0, len(x), batch_size):
        xb = ops.convert_to_tensor(x[lo:lo + batch_size])
        mean, log_var = vae.encoder(xb, training=False)
        z = reparameterise(mean, log_var, ops.convert_to_tensor(noise[lo:lo + batch_size]))
        reconstruction, kl = loss_terms(xb, vae.decoder(z, training=False), mean, log_var)
        sums += [float(ops.sum(reconstruction)), float(ops.sum(kl))]
    seconds = time.perf_counter() - start
    reconstruction, kl = sums / len(x)
    return {"reconstruction": float(reconstruction), "kl": float(kl),
            "total": float(reconstruction + kl), "seconds": seconds}
