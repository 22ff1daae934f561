"""FedLPS: learnable personalised sparsification with P-UCBV keep ratios (Xue et al., "Learnable
Sparse Customization in Heterogeneous Edge Computing", arXiv 2412.07216), as specified in
METHODS.md, section "FedLPS".

Round t, server (`configure`): every sampled client gets a keep ratio rho: its P-UCBV bandit draws
a ~ U(arm) and rho = min(tier cap, a) (`keep_ratio_policy: bandit`, fedlps/pucbv.py); or rho = the
tier cap (`rcr`, the paper's RCR ablation); or rho = `keep_ratio` for every client, ignoring the
caps as the authors' mask-strategy ablation does (`fixed`). The broadcast is the global model.

Client (`local_update`): the full-width model with the global weights, one importance score per unit
of every maskable group (fedlps/masks.py). Before every minibatch the mask is recomputed: per group
the top k = max(1, floor(rho * N)) units by sigmoid(score); masked units' outputs are zeroed through
`model.unit_masks` and every coordinate that a masked unit touches keeps its value exactly (the
harness's update masks). Loss = cross-entropy + lambda * score regulariser. After training the
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
  a straight-through estimator and by the per-unit regulariser.
- `reference`: the authors' code (sunnyxuejj/FedLPS): scores re-drawn every round, no task gradient,
  regulariser against the layer-mean target, noise on the aggregate, personalised models only from
  trainings above 1/4. Each quirk is implemented and documented below where it happens.

Mask strategies (`mask`, the paper's ablation): `learnable` (the above) or masks fixed for the round:
`random`, `magnitude` (largest unit L1 norm of the global weights), `ordered` (prefix). They have no
scores and no regulariser; everything else (bandit, aggregation, personalised evaluation) is shared.

Cost model: FLOPs = 3 x forward FLOPs of the model at the kept widths x samples processed. Bytes down
= the dense global model. Bytes up = the kept coordinates of every tensor a maskable group touches
(4 bytes each), every other tensor in full, plus one bit per unit for the mask (so the BN running
statistics of masked units, which local training does update, stay global). The wall time does
NOT reflect the sparsity: the mask may change before every minibatch, so no physically smaller model
can be built; training runs the dense model with zeroed units.

Other deliberate differences from the authors' code, following METHODS.md: masked units are zeroed
after their norm (their bias and BN shift too; the code only zeroes the weights, so a masked unit still
outputs its bias); the mask keeps exactly k units (the code's strict threshold keeps k - 1, and none at
k = 1); no FedProx term (the code's `--fedprox` flag is always on, lamda 0.001) and SGD without
momentum (the code defaults to 0.5), as the harness's training config says; for the mask-strategy
ablation the clients are evaluated with their personalised models (the ablation code evaluates the
global model). `acc_global` is None: the paper reports personalised accuracy, and METHODS.md reports
the whole-test-set accuracy for global methods only.
"""
from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from fedlps.masks import (fixed_masks, init_scores_paper, init_scores_reference, keep_widths, score_masks,
                          score_regularizer, straight_through)
from fedlps.pucbv import PUCBV
from harness.batched import BatchedLocalSGD, LocalJob
from harness.cost import training_flops
from harness.seeding import rng, seed_of
from harness.strategy import ClientResult, ClientTask, Evaluation, MethodParams, Strategy
from harness.submodel import coordinate_masks, state_bytes, unit_l1_norms
from harness.training import local_sgd

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


class FedLPS(BatchedLocalSGD, Strategy):
    Params = FedLPSParams

    # -- server ------------------------------------------------------------------------------------
    def setup(self, store):
        super().setup(store)
        self.global_state = self.bench.init_global_state()
        self.personal_acc = np.full(len(self.bench.clients), np.nan)

    def _new_bandit(self, client_id: int) -> PUCBV:
        cfg = self.bench.cfg
        return PUCBV.new(seed_of(cfg.seed, "pucbv", client_id), horizon=cfg.rounds / cfg.clients.per_round,
                         num_arms=self.params.arms, low=self.params.arm_low, high=self.params.arm_high)

    def _bandit(self, client_id: int) -> PUCBV:
        state = self.store.get(client_id, "bandit")
        return self._new_bandit(client_id) if state is None else PUCBV.from_dict(state)

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

    def aggregate(self, rnd, results):
        p = self.params
        total = {k: torch.zeros_like(v) for k, v in self.global_state.items()}
        for r in results:
            for k, d in r.payload.items():
                total[k] += d.to(total[k].dtype)
        new_state = {k: g + total[k] / len(results) for k, g in self.global_state.items()}
        if p.variant == "reference" and p.reference_noise > 0:
            # Reference quirk (agg/avg.py `avg`): Gaussian noise of std `dp` = 0.001 on every tensor of
            # the aggregated model, BN statistics included.
            gen = rng(self.bench.cfg.seed, "fedlps-noise", rnd)
            for k, v in new_state.items():
                noise = torch.from_numpy(gen.standard_normal(tuple(v.shape))).to(v.dtype)
                new_state[k] = v + p.reference_noise * noise
        self.global_state = new_state

        for r in results:
            if p.keep_ratio_policy == "bandit" and not math.isnan(r.train_acc):
                bandit = self._bandit(r.client_id)
                bandit.observe(r.keep_ratio, r.train_acc, r.sim_compute_s + r.sim_up_s)
                self.store.put(r.client_id, bandit.to_dict(), "bandit")
            acc = r.metrics.get("acc_personal", math.nan)
            # Reference quirk (FedLPS.py): a training at a keep ratio of 1/4 or less does not replace the
            # client's personalised model.
            if p.variant == "reference" and r.keep_ratio <= REFERENCE_MIN_PERSONAL_RATIO:
                continue
            if not math.isnan(acc):
                self.personal_acc[r.client_id] = acc
        return {}

    def evaluate(self, rnd):
        acc = self.personal_acc.copy()
        missing = np.isnan(acc)
        if missing.any():
            acc[missing] = self.bench.evaluate_global(self.global_state).client_acc[missing]
        return Evaluation(client_acc=acc, acc_global=None)

    def state_dict(self):
        # Bandits (with their random generators) and the paper variant's scores live in the client
        # store, which the harness checkpoints; the aggregation noise is a function of (seed, round).
        return {"global_state": self.global_state, "personal_acc": self.personal_acc.tolist()}

    def load_state_dict(self, state):
        self.global_state = state["global_state"]
        self.personal_acc = np.asarray(state["personal_acc"], dtype=float)

    # -- client ------------------------------------------------------------------------------------
    def _initial_scores(self, task: ClientTask, global_state, generator) -> dict[str, torch.Tensor]:
        bench, p = self.bench, self.params
        if p.variant == "reference":
            # Reference quirk (Models.WeightLayer): fresh sorted N(0, 1) scores every round, so each
            # round starts from the prefix mask and nothing is learnt across rounds.
            return init_scores_reference(bench.full_widths, generator)
        if task.state is not None:
            return {g: s.clone() for g, s in task.state.items()}
        return init_scores_paper(unit_l1_norms(global_state, bench.layout), p.score_init_noise, generator)

    # local_update = local_job, then local_sgd, then local_result (harness.batched.BatchedLocalSGD).
    # Masks fixed for the round (random, magnitude, ordered) batch: they are plain unit and update
    # masks. Learnable masks change before every minibatch through hooks: those clients train alone.
    def local_job(self, global_state, task: ClientTask) -> LocalJob:
        bench, p = self.bench, self.params
        rho = float(task.instruction["keep_ratio"])
        generator = bench.generator(task.round, task.client_id)
        model = bench.load(bench.build(), global_state)
        widths = keep_widths(bench.full_widths, rho)
        param_shapes = {n: q.shape for n, q in model.named_parameters()}
        x, y = bench.train_data(task.client_id)
        lr = bench.lr(task.round)
        learnable = p.mask == "learnable"
        paper = p.variant == "paper"

        current: dict[str, dict[str, torch.Tensor]] = {}  # the hard masks and coordinate masks in use
        scores: dict[str, torch.Tensor] = {}
        hooks = {}
        if learnable:
            scores = {g: s.to(bench.device).requires_grad_(True)
                      for g, s in self._initial_scores(task, global_state, generator).items()}

            def before_batch():
                hard = {g: m.to(bench.device) for g, m in score_masks(scores, widths).items()}
                current["hard"] = hard
                current["coords"] = coordinate_masks(bench.layout, param_shapes, hard)
                model.unit_masks = {g: straight_through(hard[g], scores[g]) for g in hard} if paper else hard

            hooks["before_batch"] = before_batch
            if p.lam > 0:
                def regularizer():
                    with torch.no_grad():
                        norms = unit_l1_norms(dict(model.named_parameters()), bench.layout)
                        if not paper:
                            # Reference quirk: the code computes the target from the weights after
                            # masking, so a masked unit's target is sigmoid(0) = 0.5.
                            norms = {g: v * current["hard"][g] for g, v in norms.items()}
                    return score_regularizer(scores, norms, p.lam, per_unit=paper)

                hooks["regularizer"] = regularizer
            if not paper:
                def after_backward(_batch_size):
                    # Reference quirk: the code multiplies the scores' gradients by the mask, so only
                    # the kept units' scores move.
                    for g, s in scores.items():
                        if s.grad is not None:
                            s.grad.mul_(current["hard"][g])

                hooks["after_backward"] = after_backward
        else:
            norms = unit_l1_norms(global_state, bench.layout) if p.mask == "magnitude" else None
            hard = {g: m.to(bench.device) for g, m in
                    fixed_masks(p.mask, widths, bench.full_widths, generator, norms).items()}
            current["hard"] = hard
            current["coords"] = coordinate_masks(bench.layout, param_shapes, hard)
            model.unit_masks = hard

        if learnable:
            hooks.update(extra_params=list(scores.values()), extra_lr=p.score_lr if p.score_lr is not None else lr)
            update_masks = lambda: current["coords"]  # noqa: E731 - recomputed before every minibatch
        else:
            update_masks = current["coords"]
        # train_fn: this module's local_sgd (tests wrap it); anything else than harness's runs alone
        return LocalJob(model, x, y, bench.cfg.train, lr, generator, clip_grad_norm=p.clip_grad_norm,
                        update_masks=update_masks, hooks=hooks, train_fn=local_sgd,
                        context=dict(rho=rho, widths=widths, current=current, scores=scores, learnable=learnable,
                                     paper=paper))

    def local_result(self, global_state, task: ClientTask, job: LocalJob) -> ClientResult:
        bench = self.bench
        model, stats, y = job.model, job.stats, job.y
        rho, widths, current, scores = (job.context[k] for k in ("rho", "widths", "current", "scores"))
        learnable, paper = job.context["learnable"], job.context["paper"]

        # The personalised model: the trained weights with the mask of the last minibatch (the one
        # its weights were trained under; the scores have moved one step since).
        hard = {g: m.detach() for g, m in current["hard"].items()}
        model.unit_masks = hard
        acc_personal = bench.accuracy_on_client(model, task.client_id)

        trained = {k: v.detach().cpu() for k, v in model.state_dict().items() if k in global_state}
        hard_cpu = {g: m.cpu() for g, m in hard.items()}
        coords = coordinate_masks(bench.layout, {k: v.shape for k, v in trained.items()}, hard_cpu)
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

        metrics = {"acc_personal": acc_personal}
        if "arm_low" in task.instruction:
            metrics.update(arm_low=task.instruction["arm_low"], arm_high=task.instruction["arm_high"])
        new_state = {g: s.detach().cpu().clone() for g, s in scores.items()} if (learnable and paper) else None
        return ClientResult(
            task.client_id, task.round, payload=update, num_samples=len(y), train_loss=stats.loss,
            train_acc=stats.accuracy, keep_ratio=rho,
            flops=training_flops(bench.flops.forward(widths), stats.samples),
            bytes_up=bytes_up, bytes_down=state_bytes(global_state), metrics=metrics, state=new_state)
