"""One training step, jitted: accumulated exact gradients, the optimizer update, V3's bias update.

Mixed precision: the trainable weights live in the train state as float32 master copies, and the
optimizer state is float32 with them. Each forward pass casts the masters to the model's weight
dtype (bfloat16 or float32); the gradient flows back through the cast, so it arrives in float32,
and updates too small for bfloat16 still accumulate in the masters.

A batch is [A,B,T]: A micro batches of B rows scanned one after another. Each micro batch adds the
gradient of (its cross-entropy sum / the batch's target count + its share of the balance losses),
so the summed gradient is exactly that of the whole batch's mean loss, whatever A is. (V2's
expert-level loss is the exception: like DeepSeek's, it is computed per micro batch and averaged.)

The train state is a dict of plain pytrees (what the checkpoint saves):
  params  {name: float32}  trainable masters (all nnx.Param, or the LoRA adapters)
  bias    {name: float32}  the routers' e_score_correction_bias (not a parameter)
  opt     optax state
  rng     uint32[2]        PRNG key data, split every step (the model has no dropout today)
  step    int32            updates done; also the data position

The step is compiled once per `Spec` (model layout + train config), shared by every `Trainer` of
an equal model: a resumed run in the same process does not compile again.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from mla_jax.model import Transformer, layer_runs
from mla_jax.quant.apply import scheme_of
from mla_jax.quant.blocks import Quantized
from mla_jax.parallel.mesh import auto_axes, mesh_of, on_mesh, put, to_host
from mla_jax.parallel.rules import batch_axes, param_sharding, replicated
from mla_jax.training import balance, lora, optim
from mla_jax.training.config import TrainConfig
from mla_jax.training.losses import cross_entropy
from mla_jax.training.params import Layout, split


@dataclasses.dataclass(frozen=True)
class Spec:
    """Everything static about a step (hashable: the key of the compiled step)."""

    layout: Layout
    tc: TrainConfig  # resolved
    compute_dtype: str
    moe_stacks: tuple[tuple[int, int], ...]  # (stack index, MoE layers in it), in layer order
    n_experts: int
    lora_targets: tuple[tuple[str, tuple[int, ...], int, int], ...]  # (kernel name, shape, layer dims, input dims)
    lora_quantized: tuple[tuple[str, Quantized], ...] = ()  # targets stored quantized (a quantized base)

    @property
    def targets(self) -> dict:
        return {name: (shape, lead, in_dims) for name, shape, lead, in_dims in self.lora_targets}

    @property
    def n_moe_layers(self) -> int:
        return sum(count for _, count in self.moe_stacks)

    def weights(self, params: dict, frozen: dict, variables: dict | None = None) -> dict:
        """The model's parameters in its compute dtype from the trainable masters (and frozen base;
        `variables`, the non-parameters, hold a quantized base's scales)."""
        if self.tc.lora_rank:
            return lora.apply(frozen, params, self.targets, self.tc.lora_alpha / self.tc.lora_rank,
                              dict(self.lora_quantized), variables)
        return {n: v.astype(self.compute_dtype) for n, v in params.items()}

    def bias_name(self, stack: int) -> str:
        """The correction bias of an MoE stack, [L,E] over its layers."""
        return f"stacks.{stack}.mlp.e_score_correction_bias"


def _loss(spec: Spec, params, frozen, bias, micro, n_targets, n_rows, n_micro):
    tc = spec.tc
    model = spec.layout.merge(spec.weights(params, frozen, bias), bias)
    logits, aux = model(micro["tokens"], positions=micro["positions"], segment_ids=micro["segment_ids"],
                        return_aux=True, remat=tc.remat)
    ce_sum, _ = cross_entropy(logits, micro["targets"], micro["loss_mask"])
    real = micro["segment_ids"] != 0
    b, t = real.shape
    aux_loss = jnp.zeros((), jnp.float32)
    if aux is None:
        return ce_sum / n_targets, (ce_sum, aux_loss, jnp.zeros((0, spec.n_experts), jnp.float32))
    # Router stats of the MoE layers, stacked along a leading layer axis L.
    scores = aux["scores"].reshape(-1, b, t, aux["scores"].shape[-1])  # [L,B,T,E]
    experts = aux["experts"].reshape(-1, b, t, aux["experts"].shape[-1])  # [L,B,T,K]
    per_layer = jax.vmap  # each layer's loss is the unstacked rule applied to its own stats
    if tc.seq_aux_alpha:
        seq = per_layer(lambda s, e: balance.sequence_balance_loss(s, e, real, tc.seq_aux_alpha))(scores, experts)
        aux_loss += jnp.sum(seq) / n_rows
    if tc.expert_aux_alpha:
        level = per_layer(lambda s, e: balance.expert_balance_loss(s, e, real, tc.expert_aux_alpha))(scores, experts)
        aux_loss += jnp.sum(level) / n_micro
    loads = per_layer(lambda e: balance.expert_load(e, spec.n_experts, real))(experts)  # [L,E]
    return ce_sum / n_targets + aux_loss, (ce_sum, aux_loss, loads)


def _grads(spec: Spec, params: dict, frozen: dict, bias: dict, batch: dict):
    """Summed gradients of the whole batch [A,B,T]; its mean CE, aux loss and loads [L,E]."""
    n_micro = batch["tokens"].shape[0]
    n_targets = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
    n_rows = jnp.maximum(jnp.sum(jnp.any(batch["segment_ids"] != 0, axis=-1).astype(jnp.float32)), 1.0)
    grad_fn = jax.value_and_grad(functools.partial(_loss, spec), has_aux=True)

    def micro_step(carry, micro):
        grads, ce, aux, loads = carry
        (_, (m_ce, m_aux, m_loads)), g = grad_fn(params, frozen, bias, micro, n_targets, n_rows, n_micro)
        return (jax.tree.map(jnp.add, grads, g), ce + m_ce, aux + m_aux, loads + m_loads), None

    zero = jnp.zeros((), jnp.float32)
    init = (jax.tree.map(jnp.zeros_like, params), zero, zero,
            jnp.zeros((spec.n_moe_layers, spec.n_experts), jnp.float32))
    (grads, ce, aux_loss, loads), _ = jax.lax.scan(micro_step, init, batch)
    return grads, ce / n_targets, aux_loss, loads


METRICS = ("loss", "aux_loss", "lr", "grad_norm", "expert_load_max_over_mean", "tokens")


def _specs(tree):
    """The PartitionSpec of every array of `tree` (its layout, as the outputs of a step keep it)."""
    return jax.tree.map(lambda x: jax.typeof(x).sharding.spec, tree)


def _step(spec: Spec, state: dict, frozen: dict, batch: dict):
    # On a mesh with Explicit axes the body runs with sharding propagation (mla_jax.parallel); the
    # new state keeps the old one's layout, the metrics are replicated.
    return auto_axes(functools.partial(_step_body, spec), (state, frozen, batch),
                     (_specs(state), {k: P() for k in METRICS}))


def _grads_on_mesh(spec: Spec, params: dict, frozen: dict, bias: dict, batch: dict):
    return auto_axes(functools.partial(_grads, spec), (params, frozen, bias, batch),
                     (_specs(params), P(), P(), P(None, None)))


def _step_body(spec: Spec, state: dict, frozen: dict, batch: dict):
    tc = spec.tc
    grads, ce, aux_loss, loads = _grads(spec, state["params"], frozen, state["bias"], batch)
    updates, opt = optimizer(spec).update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    bias = dict(state["bias"])
    if tc.bias_update_speed:
        first = 0
        for stack, count in spec.moe_stacks:
            name = spec.bias_name(stack)
            update = functools.partial(balance.update_bias, gamma=tc.bias_update_speed)
            bias[name] = jax.vmap(update)(bias[name], loads[first:first + count])
            first += count
    rng, _ = jax.random.split(jax.random.wrap_key_data(state["rng"]))
    new_state = {"params": params, "bias": bias, "opt": opt, "rng": jax.random.key_data(rng),
                 "step": state["step"] + 1}
    imbalance = jnp.mean(jax.vmap(balance.max_over_mean)(loads)) if spec.moe_stacks else jnp.full((), jnp.nan)
    metrics = {
        "loss": ce,
        "aux_loss": aux_loss,
        "lr": optim.schedule(tc)(state["step"]),
        "grad_norm": optax.tree.norm(grads),
        "expert_load_max_over_mean": imbalance,
        "tokens": jnp.sum((batch["segment_ids"] != 0).astype(jnp.int32)),
    }
    return new_state, metrics


def optimizer(spec: Spec) -> optax.GradientTransformation:
    names = [f"{n}.lora_{ab}" for n, *_ in spec.lora_targets for ab in "ab"] or spec.layout.param_names
    return optim.optimizer(spec.tc, names)


@functools.lru_cache(maxsize=16)
def _compiled_step(spec: Spec):
    return jax.jit(functools.partial(_step, spec), donate_argnums=0)


@functools.lru_cache(maxsize=16)
def _compiled_grads(spec: Spec):
    return jax.jit(functools.partial(_grads_on_mesh, spec))


class Trainer:
    """A model's step, its frozen weights (LoRA) and its initial state."""

    def __init__(self, model: Transformer, tc: TrainConfig):
        self.config = model.config
        tc = tc.resolve(model.config)
        scheme = scheme_of(model)
        if scheme is not None and not tc.lora_rank:
            raise ValueError(
                f"the model's projections are quantized ({scheme.method}, kept so by `mla-jax convert --weights "
                f"{scheme.method}`): full fine-tuning would train float copies of them all; fine-tune with LoRA "
                "(lora_rank > 0; the base stays quantized), or fully a checkpoint converted without --weights")
        layout, base, self._rest = split(model)
        # a quantized base's values are not the compute dtype; its other parameters are
        dtypes = {np.dtype(v.dtype).name for v in base.values()
                  if scheme is None or np.dtype(v.dtype) != scheme.storage_dtype}
        if len(dtypes) != 1:
            raise ValueError(f"the model's parameters mix dtypes {sorted(dtypes)}; expected one")
        targets = lora.targets(model) if tc.lora_rank else {}
        moe_stacks = tuple((k, run.count) for k, run in enumerate(layer_runs(model.config)) if run.moe)
        self.spec = Spec(layout, tc, dtypes.pop(), moe_stacks, model.config.n_routed_experts or 1,
                         tuple((n, s, lead, d) for n, (s, lead, d) in sorted(targets.items())),
                         tuple(sorted(lora.quantized_targets(model, targets).items())))
        # LoRA freezes the base in its own dtype; full fine-tuning trains float32 masters of it all.
        self.frozen = base if tc.lora_rank else {}
        self._base = base
        self.mesh = mesh_of(base)  # a model laid out on a mesh trains there (mla_jax.parallel)
        self.optimizer = optimizer(self.spec)
        self.schedule = optim.schedule(tc)
        # Looked up once: hashing the spec (the whole model graph) on every step would cost time.
        self._step_fn, self._grads_fn = _compiled_step(self.spec), _compiled_grads(self.spec)

    @property
    def tc(self) -> TrainConfig:
        return self.spec.tc

    def init_state(self) -> dict:
        """A fresh state: float32 masters of the model's weights (or new adapters), a new optimizer."""
        tc = self.tc
        if tc.lora_rank:
            params = lora.init(self.spec.targets, tc.lora_rank, jax.random.fold_in(jax.random.key(tc.seed), 1))
        else:
            # Copies: the step donates the state, and the model's own arrays must survive that.
            params = {n: jnp.array(v, jnp.float32, copy=True) for n, v in self._base.items()}
        state = {
            "params": params,
            "bias": {n: jnp.array(v, jnp.float32, copy=True) for n, v in self._rest.items()},
            "opt": self.optimizer.init(params),
            "rng": jax.random.key_data(jax.random.key(tc.seed)),
            "step": jnp.zeros((), jnp.int32),
        }
        # Committed like the step's outputs (and orbax's restores): were some leaves uncommitted,
        # the second step would compile the whole step again.
        if self.mesh is None:
            return jax.device_put(state, jax.local_devices()[0])
        return put(state, self.state_shardings(state))

    def state_shardings(self, state: dict) -> dict:
        """Where each leaf of a train state lives on the model's mesh: parameters (and the optimizer
        moments of each, found by its name in the optimizer state) by the logical-axis table,
        everything else replicated."""
        mesh = self.mesh
        params = {n: param_sharding(mesh, n, v.shape) for n, v in state["params"].items()}

        def place(path, x):
            for key in reversed(path):
                name = getattr(key, "key", None)
                if name in params and tuple(state["params"][name].shape) == tuple(x.shape):
                    return params[name]
            return replicated(mesh)

        return {"params": params, "bias": {n: replicated(mesh) for n in state["bias"]},
                "opt": jax.tree_util.tree_map_with_path(place, state["opt"]),
                "rng": replicated(mesh), "step": replicated(mesh)}

    def place_batch(self, batch: dict) -> dict:
        """Numpy arrays [A,B,T] -> device arrays, split along B like the batch on the model's mesh."""
        if self.mesh is None:
            return {k: jnp.asarray(v) for k, v in batch.items()}
        out = {}
        for k, v in batch.items():
            axes = batch_axes(self.mesh, v.shape[1])
            rows = None if not axes else axes[0] if len(axes) == 1 else axes
            # every process holds the whole batch and places its own devices' rows
            out[k] = put(v, NamedSharding(self.mesh, P(None, rows, *[None] * (np.ndim(v) - 2))))
        return out

    def abstract_state(self) -> dict:
        """A state's shapes and dtypes, and on a mesh where each leaf lives (concrete shardings, not
        the abstract mesh `eval_shape` records: a restore reads each device's shards into place)."""
        shapes = jax.eval_shape(self.init_state)
        if self.mesh is None:
            return shapes
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes,
                            self.state_shardings(shapes))

    def lower_step(self, state: dict, batch: dict) -> jax.stages.Lowered:
        """The step lowered for abstract `state` and `batch` (ShapeDtypeStructs, shardings included):
        `.compile()` it for its memory and HLO without allocating (`mla_jax.parallel.plan`)."""
        return self._step_fn.trace(state, self.frozen, batch).lower()

    def model(self, state: dict) -> Transformer:
        """The trained model (LoRA merged into the kernels, router biases as updated)."""
        return self.spec.layout.merge(self.spec.weights(state["params"], self.frozen, state["bias"]), state["bias"])

    def gradients(self, state: dict, batch: dict) -> tuple[dict, jax.Array]:
        """(gradient of the batch's mean cross-entropy + balance losses w.r.t. state["params"], mean CE)."""
        with on_mesh(self.mesh):
            grads, ce, _, _ = self._grads_fn(state["params"], self.frozen, state["bias"], self.place_batch(batch))
        return grads, ce

    def train_step(self, state: dict, batch: dict):
        """(state, batch of numpy arrays [A,B,T]) -> (new state, metrics as python numbers). Donates `state`."""
        with on_mesh(self.mesh):
            new_state, metrics = self._step_fn(state, self.frozen, self.place_batch(batch))
        return new_state, {k: to_host(v).item() for k, v in metrics.items()}
