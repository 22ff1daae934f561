"""FedLPS: learnable personalised sparsification with P-UCBV keep ratios (Xue et al., "Learnable
Sparse Customization in Heterogeneous Edge Computing", arXiv 2412.07216), as specified in
METHODS.md, section "FedLPS".

Round t, server (`configure`): every sampled client gets a keep ratio rho: its P-UCBV bandit draws
a ~ U(arm) and rho = min(tier cap, a) (`keep_ratio_policy: bandit`, fedlps/pucbv.py); or rho = the
tier cap (`rcr`, the paper's RCR ablation); or rho = `keep_ratio` for every client, ignoring the
caps as the authors' mask-strategy ablation does (`fixed`). The broadcast is the global model.

Client (`local_job`, `local_result`): the full-width model with the global weights, one importance score per unit
of every maskable group (fedlps/masks.py). Before every minibatch the mask is recomputed: per group
the top k = max(1, floor(rho * N)) units by sigmoid(score); masked units' outputs are zeroed through
`model.unit_masks` and every coordinate that a masked unit touches keeps its value exactly (the
harness's update masks). (The reference variant masks otherwise: see Variants.) Loss = cross-entropy + lambda * score regulariser. After training the
client's personalised model (the trained weights with the final mask) is evaluated on its test set,
and it uploads the masked update W*m - W_global*m (the coordinates of kept units; the full update of
tensors no maskable group touches) with the unit-mask bitmap.

Server (`aggregate`): w_global += the plain mean over the sampled clients of their updates (masked
coordinates count as zero updates); each client's bandit is credited with
r = (U(acc) - U(best earlier acc)) / (t_compute + t_upload) from its training accuracy and simulated
times. `evaluate`: every client with its latest personalised model's accuracy, measured right after
that training (the model does not change until the client trains again); a client that never
trained, with the current global model.

Variants (`variant`):
- `paper`: scores are the client's personal state (never uploaded), initialised at its first
  participation to sigmoid(||W_u||_1) plus N(0, score_init_noise^2), trained by the task loss through
  a straight-through estimator and by the per-unit regulariser, by plain SGD (no weight decay). The
  bandit's reward divides by the simulated compute + upload time. Masked units are cut out whole
  (see below).
- `reference`: the authors' code (sunnyxuejj/FedLPS at 35fafba), every quirk implemented and
  documented where it happens, naming their file and function:
  - scores re-drawn every round (sorted N(0, 1): the round starts from the prefix mask), no task
    gradient, only the kept units' scores get the regulariser's gradient, which pulls them to the
    layer-MEAN target computed from the masked weights (Models.WeightLayer, Hetero_Client.loss);
  - the scores share the weights' SGD optimizer, weight decay included (`_reference_hooks`);
  - the mask keeps the units strictly above the k-th largest sigmoid(score), k = max(int(rho N), 1):
    k - 1 units, none at k = 1 (fedlps/masks.py `reference_score_masks`), so at a keep ratio of 1/16
    the CNN keeps no unit of conv1 and conv2;
  - only the masked units' incoming weight rows are zeroed and frozen: their bias (and BN) and the
    next layer's weights that read them keep training and are uploaded, and a masked unit outputs its
    bias, in training and in the personalised model (`_reference_hooks`, masks.py `weight_row_masks`);
  - P-UCBV as the code runs it (fedlps/pucbv.py `ReferencePUCBV`: scores in the reward dict's
    insertion order applied to the arms in interval order, pull counts raised at decision time,
    rewards credited to the code's arm), its reward divided by the code's MNIST (or CIFAR) cost
    constants instead of the simulated clock (fedlps/reference_cost.py; the client column `reward_s`);
  - Gaussian noise of std 0.001 on every aggregated tensor (agg/avg.py `avg`);
  - personalised models only from trainings above a keep ratio of 1/4 (FedLPS.py).
  tests/test_authors_code.py runs the authors' code unchanged next to these (given a checkout of it):
  the bandit's decisions, arms, pull counts and rewards over 50 clients x 12 rounds, the masks of 100
  random layers and the FLOP and upload counts are identical, and a client's update over three
  full-batch steps (keep ratios 1/2 and 1/16) agrees to within 1e-6.

Mask strategies (`mask`, the paper's ablation): `learnable` (the above) or masks fixed for the round:
`random`, `magnitude` (largest unit L1 norm of the global weights), `ordered` (prefix). They have no
scores and no regulariser; everything else (bandit, aggregation, personalised evaluation) is shared.

Cost model: FLOPs = 3 x forward FLOPs of the model at the kept widths x samples processed. Bytes down
= the dense global model. Bytes up = the kept coordinates of every tensor a maskable group touches
(4 bytes each), every other tensor in full, plus one bit per unit for the mask (so the BN running
statistics of masked units, which local training does update, stay global); with the reference
variant's learnable masks, the kept rows of the masked weights and every other tensor in full. The
wall time does NOT reflect the sparsity: the mask may change before every minibatch, so no physically
smaller model can be built; training runs the dense model with zeroed units.

The authors' code is read at the commit every reference variant of fedbench pins: sunnyxuejj/FedLPS
35fafba2171fac0b0de374ffcd2a85eb40bc975e (its HEAD, 2024-12-12). There `utils/options.py` turns
FedProx off (`--fedprox` False) and sets momentum 0, so both variants train without a FedProx term and
without momentum, as the harness's training config says; at the repository's first commit (dbbbcf7)
FedProx was on (lamda 0.001) and momentum 0.5.

How the `paper` variant differs from the authors' code, following METHODS.md: masked units are
zeroed after their norm (their bias and BN shift too; the code only zeroes the weights, so a masked
unit still outputs its bias), and every coordinate a masked unit touches (its bias, its BN, the next
layer's weights that read it) keeps its value and is left out of the upload; the mask keeps exactly
k units; the scores persist and learn (above); P-UCBV credits the arm that holds the ratio used and
divides by the simulated time (fedlps/pucbv.py); no aggregation noise. In both variants, for the
mask-strategy ablation the clients are evaluated with their personalised models (the ablation code
evaluates the global model), and the fixed masks (random, magnitude, ordered) are applied as in the
paper variant. `acc_global` is None: the paper reports personalised accuracy, and METHODS.md reports
the whole-test-set accuracy for global methods only. The simulated clock counts the same FLOPs in
both variants: those of the model at the nominal kept widths k.
"""
from __future__ import annotations

import functools
import math
from typing import Literal

import numpy as np
import pyarrow as pa
import torch
from pydantic import Field, model_validator

from baselines.fedavg import with_authors_noise
from fedlps.masks import (fixed_masks, init_scores_paper, init_scores_reference, keep_widths, reference_score_masks,
                          score_masks, score_regularizer, straight_through, weight_row_masks)
from fedlps.pucbv import PUCBV, ReferencePUCBV
from fedlps.reference_cost import CIFAR, MNIST, ReferenceRewardCost
from harness.cost import training_flops
from harness.columns import TEST_SET_SUFFIX, TEST_SETS
from harness.records import ClientResult, ClientTask, Evaluation
from harness.seeding import seed_of
from harness.strategy import Client, MethodParams, Strategy
from harness.submodel import coordinate_masks, state_bytes, unit_l1_norms
from harness.training import Hooks, LocalJob

# Reference variant: only trainings at a keep ratio above this replace a client's personalised model
# (FedLPS.py keeps `final_parameters` only when mask_rate > mask_rate_list[2] = 0.25).
REFERENCE_MIN_PERSONAL_RATIO = 0.25


class FedLPSParams(MethodParams):
    """clip_grad_norm (inherited) stays None by default: the authors' FedLPS does not clip."""

    variant: Literal["paper", "reference"] = "paper"
    lam: float = Field(1.0, ge=0, description="lambda, weight of the score regulariser")
    score_lr: float | None = Field(
        None, gt=0, description="learning rate of the scores; None: the round's local lr, as in the authors' "
                                "code, where the scores share the weights' SGD optimizer")
    score_init_noise: float = Field(0.01, ge=0, description="paper variant: std of the noise added to the "
                                                            "initial scores sigmoid(||W_u||_1)")
    keep_ratio_policy: Literal["bandit", "rcr", "fixed"] = "bandit"
    keep_ratio: float = Field(0.5, gt=0, le=1, description="the `fixed` policy's keep ratio, for every client "
                                                                 "whatever its tier (as in the authors' ablation)")
    mask: Literal["learnable", "random", "magnitude", "ordered"] = "learnable"
    reference_noise: float = Field(0.001, ge=0, description="reference variant: std of the Gaussian noise "
                                                            "added to the aggregated model")
    arms: int = Field(5, ge=1, description="P-UCBV: initial number of equal arms")
    arm_low: float = Field(0.5, gt=0, lt=1, description="P-UCBV: lower end of the initial arms")
    arm_high: float = Field(1.0, gt=0, le=1, description="P-UCBV: upper end of the initial arms")

    @model_validator(mode="after")
    def _arm_range(self):
        if self.arm_low >= self.arm_high:
            raise ValueError(f"arm_low ({self.arm_low}) must be below arm_high ({self.arm_high})")
        return self


class FedLPSClient(Client):
    def _initial_scores(self, task: ClientTask, global_state, generator) -> dict[str, torch.Tensor]:
        bench, p = self.bench, self.params
        if p.variant == "reference":
            # Reference quirk (Models.WeightLayer): fresh sorted N(0, 1) scores every round, so each
            # round starts from the prefix mask and nothing is learnt across rounds.
            return init_scores_reference(bench.full_widths, generator)
        if task.state is not None:
            return {g: s.clone() for g, s in task.state.items()}
        return init_scores_paper(unit_l1_norms(global_state, bench.layout), p.score_init_noise, generator)

    @functools.cached_property
    def reward_cost(self) -> ReferenceRewardCost:
        bench = self.bench
        return ReferenceRewardCost(bench.build(device="meta"), bench.image_shape, bench.full_widths,
                                   bench.cfg.train.batch_size, MNIST if bench.model_name == "cnn" else CIFAR)

    # Masks fixed for the round (random, magnitude, ordered) batch: they are plain unit and update
    # masks. Learnable masks change before every minibatch through hooks: those clients train alone.
    def local_job(self, global_state, task: ClientTask) -> LocalJob:
        bench, p = self.bench, self.params
        rho = float(task.instruction["keep_ratio"])
        generator = bench.generator(task.round, task.client_id)
        widths = keep_widths(bench.full_widths, rho)
        learnable = p.mask == "learnable"
        paper = p.variant == "paper"
        current: dict[str, dict[str, torch.Tensor]] = {}  # the hard masks and coordinate masks in use
        context = dict(rho=rho, widths=widths, current=current, scores={}, learnable=learnable, paper=paper)
        if not learnable:
            norms = unit_l1_norms(global_state, bench.layout) if p.mask == "magnitude" else None
            hard = {g: m.to(bench.device) for g, m in
                    fixed_masks(p.mask, widths, bench.full_widths, generator, norms).items()}
            current.update(hard=hard, coords=coordinate_masks(bench.layout, bench.param_shapes, hard))
            return bench.job(task, global_state, generator=generator, clip_grad_norm=p.clip_grad_norm,
                             unit_masks=hard, update_masks=current["coords"], context=context)

        scores = {g: s.to(bench.device).requires_grad_(True)
                  for g, s in self._initial_scores(task, global_state, generator).items()}
        context["scores"] = scores
        lr = p.score_lr if p.score_lr is not None else bench.lr(task.round)
        hooks = self._paper_hooks(scores, widths, current, lr) if paper else \
            self._reference_hooks(scores, rho, current, lr)
        return bench.job(task, global_state, generator=generator, clip_grad_norm=p.clip_grad_norm, hooks=hooks,
                         context=context)

    def _paper_hooks(self, scores, widths, current, score_lr):
        """Before every minibatch the top-k mask of the scores, applied to the units' outputs
        through the straight-through estimator; every coordinate a masked unit touches is frozen."""
        bench, p = self.bench, self.params

        def hooks(model) -> Hooks:
            def before_batch():
                hard = {g: m.to(bench.device) for g, m in score_masks(scores, widths).items()}
                current.update(hard=hard, coords=coordinate_masks(bench.layout, bench.param_shapes, hard))
                model.unit_masks = {g: straight_through(hard[g], scores[g]) for g in hard}

            def regularizer():
                with torch.no_grad():
                    norms = unit_l1_norms(dict(model.named_parameters()), bench.layout)
                return score_regularizer(scores, norms, p.lam, per_unit=True)

            return Hooks(before_batch=before_batch, regularizer=regularizer if p.lam > 0 else None,
                         update_masks=lambda: current["coords"], extra_params=list(scores.values()),
                         extra_lr=score_lr)

        return hooks

    def _reference_hooks(self, scores, rho, current, score_lr):
        """The authors' minibatch (Hetero_Client.update_weights_leanable with Models.WeightLayer):
        the mask of the scores (`reference_score_masks`: k - 1 units) zeroes the masked units'
        incoming weights in place, their values held aside; the step leaves those rows as they are
        (gradients times the mask); before the next minibatch they get their values back
        (CommenNet.weight_recover). After the last step the rows stay zero, as in the code's
        `cur_params`, which it uploads and keeps as the personalised model."""
        bench, p = self.bench, self.params
        weight_decay = bench.cfg.train.weight_decay

        def hooks(model) -> Hooks:
            params = dict(model.named_parameters())
            held: dict[str, torch.Tensor] = {}  # the code's `bias_layer_dict`: W - W * mask

            @torch.no_grad()
            def before_batch():
                for name, values in held.items():
                    params[name].add_(values)
                hard = {g: m.to(bench.device) for g, m in reference_score_masks(scores, rho).items()}
                rows = weight_row_masks(bench.layout, bench.param_shapes, hard)
                for name, m in rows.items():
                    held[name] = params[name] - params[name] * m
                    params[name].mul_(m)
                current.update(hard=hard, coords=rows)

            def regularizer():
                # Reference quirk (Hetero_Client.loss): the target is computed from `param.data`, the
                # masked weights, so a masked unit's target is sigmoid(0) = 0.5.
                with torch.no_grad():
                    norms = unit_l1_norms(params, bench.layout)
                return score_regularizer(scores, norms, p.lam, per_unit=False)

            def after_backward(_batch_size):
                # Reference quirks (update_weights_leanable, reset_optimizer): the scores' gradients are
                # multiplied by the mask, so only the kept units' scores learn; the scores share the
                # weights' SGD optimizer and its weight decay (--wdecay), which shrinks every score,
                # masked or not, by lr x weight_decay x score per step.
                for g, s in scores.items():
                    grad = s.grad if s.grad is not None else torch.zeros_like(s)
                    s.grad = torch.add(grad * current["hard"][g], s.detach(), alpha=weight_decay)

            return Hooks(before_batch=before_batch, regularizer=regularizer if p.lam > 0 else None,
                         after_backward=after_backward, update_masks=lambda: current["coords"],
                         extra_params=list(scores.values()), extra_lr=score_lr)

        return hooks

    def local_result(self, global_state, task: ClientTask, job: LocalJob) -> ClientResult:
        bench = self.bench
        stats, y = job.stats, job.y
        rho, widths, current, scores = (job.context[k] for k in ("rho", "widths", "current", "scores"))
        learnable, paper = job.context["learnable"], job.context["paper"]
        weight_rows_only = learnable and not paper  # the authors' masks (`_reference_hooks`)

        # The personalised model: the trained weights with the mask of the last minibatch (the one
        # its weights were trained under; the scores have moved one step since). With the authors'
        # masks the trained weights hold it already (zero rows), and masked units output their bias.
        hard = {g: m.detach() for g, m in current["hard"].items()}
        model = bench.trained_model(job)
        model.unit_masks = {} if weight_rows_only else hard
        acc_personal = bench.accuracy_on_client(model, task.client_id)

        trained = {k: v.cpu() for k, v in job.trained.items() if k in global_state}
        hard_cpu = {g: m.cpu() for g, m in hard.items()}
        shapes = {k: v.shape for k, v in trained.items()}
        coords = (weight_row_masks if weight_rows_only else coordinate_masks)(bench.layout, shapes, hard_cpu)
        update, bytes_up = {}, 0
        for k, w in trained.items():
            delta = w - global_state[k].to(w.dtype)
            if k in coords:
                delta = delta * coords[k].to(delta.dtype)
                bytes_up += int(coords[k].sum()) * w.element_size()
            else:
                bytes_up += w.numel() * w.element_size()
            update[k] = delta
        bytes_up += (sum(bench.full_widths.values()) + 7) // 8

        metrics = {f"acc_personal{TEST_SET_SUFFIX[kind]}": acc for kind, acc in acc_personal.items()}
        if "arm_low" in task.instruction:
            metrics.update(arm_low=task.instruction["arm_low"], arm_high=task.instruction["arm_high"])
            if not paper:
                kept = {g: int(m.sum()) for g, m in hard_cpu.items()}
                metrics["reward_s"] = self.reward_cost.seconds(kept, stats.steps, task.tier.cap)
        new_state = {g: s.detach().cpu().clone() for g, s in scores.items()} if (learnable and paper) else None
        return ClientResult(
            task.client_id, task.round, payload=update, num_samples=len(y), train_loss=stats.loss,
            train_acc=stats.accuracy, keep_ratio=rho,
            flops=training_flops(bench.flops.forward(widths), stats.samples),
            bytes_up=bytes_up, bytes_down=state_bytes(global_state), metrics=metrics, state=new_state)


class FedLPS(Strategy):
    Client = FedLPSClient
    Params = FedLPSParams
    title = "FedLPS"
    client_columns = {"arm_low": pa.float64(), "arm_high": pa.float64(), "reward_s": pa.float64(),
                      **{f"acc_personal{TEST_SET_SUFFIX[kind]}": pa.float64() for kind in TEST_SETS}}

    @classmethod
    def describe(cls, params):
        """'FedLPS (reference)', 'FedLPS (RCR)', 'FedLPS (random masks, keep ratio 0.5)'."""
        params = dict(params)
        parts = [params.pop("variant")] if "variant" in params else []
        policy = params.pop("keep_ratio_policy", "bandit")
        mask = params.pop("mask", None)
        if policy == "rcr":
            parts.append("RCR")
        elif policy == "fixed":
            parts.append(f"{mask or 'learnable'} masks, keep ratio {params.pop('keep_ratio', 0.5):g}")
        if mask and policy != "fixed":
            parts.append(f"{mask} masks")
        parts += [f"{k} {v}" for k, v in sorted(params.items())]
        return f"FedLPS ({', '.join(parts)})" if parts else "FedLPS"

    # -- server ------------------------------------------------------------------------------------
    def setup(self, store):
        super().setup(store)
        self.global_state = self.bench.init_global_state()
        # per test-set construction, the latest personalised accuracy of each client the evaluation reports
        # (bench.clients.eval_ids: all clients of a partition, a cohort of synthetic ones; NaN: none yet)
        self.eval_position = {int(c): k for k, c in enumerate(self.bench.clients.eval_ids)}
        self.personal_acc = {kind: np.full(len(self.eval_position), np.nan) for kind in TEST_SETS}

    @property
    def _bandit_class(self) -> type[PUCBV] | type[ReferencePUCBV]:
        return ReferencePUCBV if self.params.variant == "reference" else PUCBV

    def _bandit(self, client_id: int) -> PUCBV | ReferencePUCBV:
        cfg, p = self.bench.cfg, self.params
        state = self.store.get(client_id, "bandit")
        if state is not None:
            return self._bandit_class.from_dict(state)
        return self._bandit_class.new(seed_of(cfg.seed, "pucbv", client_id), horizon=cfg.rounds / cfg.clients.per_round,
                                      num_arms=p.arms, low=p.arm_low, high=p.arm_high)

    def configure(self, rnd, clients):
        p = self.params
        instructions = []
        for slot in clients:
            if p.keep_ratio_policy == "bandit":
                bandit = self._bandit(slot.client_id)
                d = bandit.decide()
                self.store.put(slot.client_id, bandit.to_dict(), "bandit")
                instructions.append({"keep_ratio": min(slot.tier.cap, d.ratio), "arm_low": d.low, "arm_high": d.high})
            elif p.keep_ratio_policy == "rcr":
                instructions.append({"keep_ratio": slot.tier.cap})
            else:
                instructions.append({"keep_ratio": p.keep_ratio})
        return self.global_state, instructions

    def aggregate(self, rnd, kept, dropped):
        """Dropped clients change nothing: no update, no reward (their bandit advanced when the round
        was configured), no new personalised model."""
        p = self.params
        if not kept:
            return {}
        total = {k: torch.zeros_like(v) for k, v in self.global_state.items()}
        for r in kept:
            for k, d in r.payload.items():
                total[k] += d.to(total[k].dtype)
        new_state = {k: g + total[k] / len(kept) for k, g in self.global_state.items()}
        if p.variant == "reference" and p.reference_noise > 0:
            # Reference quirk (agg/avg.py `avg`): Gaussian noise of std `dp` = 0.001 on every tensor of
            # the aggregated model, BN statistics included.
            new_state = with_authors_noise(new_state, self.bench.cfg.seed, "fedlps", rnd, p.reference_noise)
        self.global_state = new_state

        for r in kept:
            if p.keep_ratio_policy == "bandit" and not math.isnan(r.train_acc):
                bandit = self._bandit(r.client_id)
                # Reference quirk (FedLPS.py): the reward's time from the code's constants (reward_s,
                # fedlps/reference_cost.py), not from the simulated clock.
                seconds = r.metrics["reward_s"] if p.variant == "reference" else r.sim_compute_s + r.sim_up_s
                bandit.observe(r.keep_ratio, r.train_acc, seconds)
                self.store.put(r.client_id, bandit.to_dict(), "bandit")
            # Reference quirk (FedLPS.py): a training at a keep ratio of 1/4 or less does not replace the
            # client's personalised model.
            if p.variant == "reference" and r.keep_ratio <= REFERENCE_MIN_PERSONAL_RATIO:
                continue
            for kind in TEST_SETS:
                acc = r.metrics.get(f"acc_personal{TEST_SET_SUFFIX[kind]}", math.nan)
                if not math.isnan(acc) and r.client_id in self.eval_position:
                    self.personal_acc[kind][self.eval_position[r.client_id]] = acc
        return {}

    def evaluate(self, rnd):
        """Each client with its latest personalised model; a client without one with the global model."""
        dense = self.bench.evaluate_global(self.global_state)
        clients = {}
        for kind in TEST_SETS:
            acc = self.personal_acc[kind].copy()
            missing = np.isnan(acc)
            acc[missing] = dense.clients[kind][missing]
            clients[kind] = acc
        return Evaluation(clients=clients, global_clients=dense.clients, acc_global=None)

    def state_dict(self):
        # Bandits (with their random generators) and the paper variant's scores live in the client
        # store, which the harness checkpoints; the aggregation noise is a function of (seed, round).
        return {"global_state": self.global_state,
                "personal_acc": {kind: acc.tolist() for kind, acc in self.personal_acc.items()}}

    def load_state_dict(self, state):
        self.global_state = state["global_state"]
        self.personal_acc = {kind: np.asarray(acc, dtype=float) for kind, acc in state["personal_acc"].items()}
