"""Distillation trainer: forward KL from the original model into its AllMem conversion,
training only the memory, on Hugging Face ``accelerate`` (one CPU, DDP, DeepSpeed, FSDP).

    recipe = load_recipe("smollm2-cpu", ["train.steps=20"])
    DistillTrainer(recipe).setup().train()

``setup()`` builds each component in a small method; ``train()`` is the loop.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from ..constants import torch_dtype
from ..files import atomic_temp_file
from ..modeling import AllMemForCausalLM
from .checkpoint import latest_checkpoint, prune_checkpoints, resume_checkpoint, save_checkpoint
from .data import (
    DataError,
    Sample,
    collate,
    counterfactual_ids,
    digit_token_ids,
    document_samples,
    file_samples,
    length_grouped_batches,
    task_samples,
)
from .losses import attention_transfer_loss, chunked_distill_loss, needle_transfer_loss, teacher_topk, write_gate_loss
from .recipe import Recipe, TrainSettings
from .teacher_cache import TeacherCache

log = logging.getLogger(__name__)


def lr_schedule(optimizer: torch.optim.Optimizer, t: TrainSettings) -> torch.optim.lr_scheduler.LambdaLR:
    """transformers' warmup-stable-decay: linear warmup from 0 over ``warmup_steps`` (step 1 has
    lr 0, step ``warmup_steps + 1`` the full lr), flat, then linear decay to 0 over the last
    ``decay_fraction`` of the steps (the last step has lr / decay_steps)."""
    from transformers import get_wsd_schedule

    decay_steps = t.steps - int(t.steps * (1 - t.decay_fraction))
    return get_wsd_schedule(optimizer, num_warmup_steps=t.warmup_steps, num_decay_steps=decay_steps,
                            num_training_steps=t.steps, decay_type="linear")


def draw_runtime(recipe: Recipe, step: int) -> dict[str, int]:
    """S, W, C for one step, drawn independently from the recipe's ranges (C <= W).

    Seeded by (seed, step), so every process draws the same and a resumed run redraws the same.
    """
    base = recipe.allmem_config()
    rng = random.Random(f"{recipe.train.seed}-runtime-{step}")
    out = {"window": base.window, "sinks": base.sinks, "chunk": base.chunk}
    ranges = recipe.randomize
    if "window" in ranges:
        out["window"] = rng.randint(*ranges["window"])
    if "sinks" in ranges:
        out["sinks"] = rng.randint(*ranges["sinks"])
    if "chunk" in ranges:
        lo, hi = ranges["chunk"]
        out["chunk"] = rng.randint(min(lo, out["window"]), min(hi, out["window"]))
    else:
        out["chunk"] = min(out["chunk"], out["window"])
    return out


def build_samples(sources: list[dict], tokenizer, seed: int, split: str) -> list[Sample]:
    samples: list[Sample] = []
    for i, src in enumerate(sources):
        kind = src["source"]
        lengths = tuple(src.get("lengths", (1024, 2048)))
        if kind == "tasks":
            tasks = tuple(src["tasks"]) if "tasks" in src else None
            kwargs = {"tasks": tasks} if tasks else {}
            if "write_marks" in src:
                kwargs["write_marks"] = src["write_marks"]
            new = task_samples(tokenizer, int(src["count"]), lengths, seed=seed + i, split=split, **kwargs)
        elif kind == "text":
            names = tuple(src["sources"]) if "sources" in src else None
            new = document_samples(tokenizer, int(src["count"]), lengths, seed=seed + i, split=split, sources=names)
        else:
            new = file_samples(tokenizer, src["path"], int(src.get("max_len", 4096)), src.get("limit"))
        if "lambda_ce" in src:
            for sample in new:
                sample.ce_weight = float(src["lambda_ce"])
        samples += new
    return samples


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (a full disk, a folder that is not writable)."""


@dataclass
class StepResult:
    loss: float
    kl: float
    ce: float
    tokens: int
    skipped: bool = False
    """The loss or the gradient was not finite: no parameter moved."""
    gate_log10_ratio: float | None = None
    """Median over layers and heads of log10(mean eta on the needle / on the rest of the context),
    for batches with a known needle while train.lambda_gate > 0 (0 = a uniform write gate)."""
    transfer_error: float | None = None
    """Mean over layers of the relative squared error between each layer's output and the pretrained
    attention's on the same inputs, while train.lambda_transfer > 0 (0 = full attention reproduced; with
    train.transfer_norm window, divided by the window attention's own error instead: 1 = no better)."""
    needle_error: float | None = None
    """The needle-specific transfer error of a recall batch while train.lambda_needle > 0 (1 = the layers
    pass on nothing of the code, 0 = they change with it as full attention does)."""
    order: float | None = None
    """The answer-order loss per scored token of a batch with known answers while train.lambda_order > 0
    (about softplus(margin) when the next answer token is as likely as the right one, -> 0 once far below)."""


class DistillTrainer:
    def __init__(self, recipe: Recipe, *, resume: bool = False, progress: bool = True):
        self.recipe, self.resume, self.progress = recipe, resume, progress
        self.out = Path(recipe.train.output_dir)
        self.step = 0
        self.bad_in_a_row = 0  # consecutive skipped (non-finite) steps
        self.elapsed_before = 0.0  # seconds the run trained before this process resumed it

    # -------------------------------------------------------------- setup
    def setup(self) -> "DistillTrainer":
        self._setup_accelerator()
        self._setup_model()
        self._setup_data()
        self._calibrate_centre()
        self._setup_optimizer()
        self._maybe_resume()
        return self

    def _setup_accelerator(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        t = self.recipe.train
        self.accelerator = Accelerator(
            mixed_precision=t.mixed_precision,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
        )
        torch.manual_seed(t.seed)
        random.seed(t.seed)

    def _setup_model(self) -> None:
        from .. import convert, load_base

        dtype = torch_dtype(self.recipe.dtype)
        base, self.tokenizer = load_base(self.recipe.base, dtype=dtype)
        model = convert(base, self.recipe.allmem_config(), base_name=self.recipe.base)
        if self.recipe.train.gradient_checkpointing:
            model.supports_gradient_checkpointing = True
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.recipe.train.init_adapter:
            model.load_memory_adapter(self.recipe.train.init_adapter)  # warm start; checks base and shapes
            log.info("warm start from adapter %s", self.recipe.train.init_adapter)
            if self.recipe.train.reset_control_heads:
                for layer in model.model.layers:
                    layer.self_attn.memory.reset_control_heads(model.allmem_config)
        model.train()
        self.params = model.memory_parameters()
        self.model = model

    CENTRE_SAMPLES = 8

    def _calibrate_centre(self) -> None:
        """A fresh memory with centre=True starts centred on the first training samples (a warm
        start keeps the adapter's means)."""
        if not self.model.allmem_config.centre or self.recipe.train.init_adapter:
            return
        from .. import calibrate_centre

        device = next(self.model.parameters()).device
        samples = self.train_samples[:self.CENTRE_SAMPLES]
        tokens = calibrate_centre(self.model, (torch.tensor([s.input_ids], device=device) for s in samples))
        log.info("centred the memory features on %d tokens of %d training samples", tokens, len(samples))

    def _setup_data(self) -> None:
        r = self.recipe
        self.train_samples = build_samples(r.data, self.tokenizer, r.train.seed, "train")
        if not any(any(s.loss_mask) for s in self.train_samples):
            raise DataError("the training data has no scored tokens (no assistant turns, no text): nothing to train on")
        self.heldout_samples = build_samples(r.heldout, self.tokenizer, r.train.seed + 1000, "heldout")
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.digit_ids = digit_token_ids(self.tokenizer)  # for the counterfactual needles of train.lambda_needle
        self.tokens_per_sample = sum(len(s) for s in self.train_samples) / max(1, len(self.train_samples))
        t = r.train
        self.teacher_cache = TeacherCache(t.teacher_cache, t.teacher_topk) if t.teacher_cache else None
        self.recall_items = self._recall_probe(t.recall_prompts, t.recall_length)
        self.reference_margins: dict[str, float] = {}
        self.eval_references: list[tuple[torch.Tensor, float, float]] = []  # per held-out sample: teacher, SWA, full
        log.info("data: %d training samples (mean %.0f tokens), %d held out", len(self.train_samples),
                 self.tokens_per_sample, len(self.heldout_samples))

    def _recall_probe(self, count: int, length: int):
        """Held-out passkey / multi-key prompts (answers far outside any trained window) for the recall margin."""
        from ..eval.recall import margin_items
        from .tasks import make_example

        rng = random.Random(f"{self.recipe.train.seed}-recall-probe")
        tasks = ("passkey", "niah_multikey")
        examples = [make_example(tasks[i % 2], self.tokenizer, length, rng, depth=rng.uniform(0.05, 0.5),
                                 split="heldout") for i in range(count)]
        return margin_items(self.tokenizer, examples, seed=self.recipe.train.seed)

    def _setup_optimizer(self) -> None:
        t = self.recipe.train
        alphas = [p for n, p in self.params.items() if n.endswith(".alpha")]
        gates = [p for n, p in self.params.items() if ".eta_proj." in n]
        others = [p for n, p in self.params.items() if not n.endswith(".alpha") and ".eta_proj." not in n]
        groups = [{"params": others}, {"params": alphas, "lr": t.lr * t.alpha_lr_mult, "weight_decay": 0.0},
                  {"params": gates, "lr": t.lr * t.eta_lr_mult}]
        self.optimizer = torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay, betas=tuple(t.betas))
        # not prepared: accelerate would step it once per process, and not on a skipped step
        self.scheduler = lr_schedule(self.optimizer, t)
        self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        # the engine's parameters (FSDP2 replaces them with sharded ones; DDP keeps them)
        self.params = {n: p for n, p in self._unwrapped.named_parameters() if n in self.params}

    def _maybe_resume(self) -> None:
        if not self.resume:
            return
        found = resume_checkpoint(self.out / "checkpoints", self.params, self.optimizer, self.scheduler,
                                  self.accelerator)
        if found is None:
            log.warning("--resume: no checkpoint under %s, starting from step 0", self.out / "checkpoints")
            return
        path, meta = found
        self.step = int(meta["step"])
        if self.accelerator.is_main_process:
            self.elapsed_before = self._forget_replayed_metrics()
        log.info("resumed from %s at step %d", path, self.step)

    def _save_recipe(self) -> None:
        """The recipe as this run resolved it (file + overrides), beside its metrics: what to read, cite
        or ship (scripts/ship_adapter.py --recipe RUN/recipe.yaml); a resume with other overrides rewrites it."""
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = atomic_temp_file(self.out, "recipe.yaml")
        tmp.write_text(yaml.safe_dump(self.recipe.to_dict(), sort_keys=False))
        tmp.replace(self.out / "recipe.yaml")

    def _forget_replayed_metrics(self) -> float:
        """Drop the records of steps after the resumed checkpoint from metrics.jsonl (they are
        trained again, and counted twice their tokens and curves would be) and return the seconds
        the kept steps took, so ``elapsed_s`` keeps counting the whole run across resumes."""
        path = self.out / "metrics.jsonl"
        if not path.is_file():
            return 0.0
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        kept = [r for r in records if r["step"] <= self.step]
        tmp = atomic_temp_file(self.out, path.name)
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        tmp.replace(path)
        trained = [r for r in kept if "eval" not in r]
        return float(trained[-1].get("elapsed_s", 0.0)) if trained else 0.0

    # ---------------------------------------------------------------- data
    def _micro_batch(self, step: int, micro: int) -> list[Sample]:
        """The data position is a pure function of (step, micro-step, rank): resuming needs only the step."""
        t = self.recipe.train
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        index = (step * t.grad_accum + micro) * world + rank
        per_epoch = math.ceil(len(self.train_samples) / t.micro_batch)
        epoch, position = divmod(index, per_epoch)
        batches = self._epoch_batches(epoch)
        return [self.train_samples[i] for i in batches[position % len(batches)]]

    @property
    def _unwrapped(self) -> AllMemForCausalLM:
        return self.accelerator.unwrap_model(self.model)

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        cached = getattr(self, "_batches_cache", None)
        if cached is None or cached[0] != epoch:
            batches = length_grouped_batches(self.train_samples, self.recipe.train.micro_batch,
                                             self.recipe.train.seed * 1000 + epoch)
            self._batches_cache = (epoch, batches)
        return self._batches_cache[1]

    # ---------------------------------------------------------------- math
    def _teacher_hidden(self, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), self._unwrapped.original_attention() as teacher:
            return teacher.model(input_ids=ids, attention_mask=attn).last_hidden_state

    def cached_teacher(self, samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k teacher targets for a batch from the cache, computing and storing the missing ones."""
        parts = []
        for sample in samples:
            hit = self.teacher_cache.get(sample)
            if hit is None:
                ids, attn, mask = (x.to(self.accelerator.device) for x in collate([sample], self.pad_id))
                hit = teacher_topk(self._teacher_hidden(ids, attn), self._unwrapped.lm_head, mask,
                                   self.recipe.train.teacher_topk)
                self.teacher_cache.put(sample, *hit)
            parts.append(hit)
        device = self.accelerator.device
        return torch.cat([p[0] for p in parts]).to(device), torch.cat([p[1] for p in parts]).to(device)

    def loss_on(self, samples: list[Sample], model=None) -> tuple[torch.Tensor, StepResult]:
        t = self.recipe.train
        ids, attn, mask = (x.to(self.accelerator.device) for x in collate(samples, self.pad_id))
        if self.teacher_cache is not None:
            teacher, topk = None, self.cached_teacher(samples)
        else:
            teacher, topk = self._teacher_hidden(ids, attn), None
        model = model or self.model
        supervise_gate = t.lambda_gate > 0 and any(s.write_mask for s in samples)
        transfer = t.lambda_transfer > 0
        counter = self._counterfactual(samples) if t.lambda_needle > 0 else None
        by_window = transfer and t.transfer_norm == "window"
        with self.accelerator.autocast(), self._eta_logits(supervise_gate) as eta_logits, \
                self._layer_targets(transfer or counter is not None, by_window) as layers:
            student = model(input_ids=ids, attention_mask=attn, use_cache=False, return_hidden=True).hidden_states
        # per-source CE weight (recall tasks); a batch uses its samples' mean (exact with micro_batch 1)
        weights = [t.lambda_ce if s.ce_weight is None else s.ce_weight for s in samples]
        answered = [bool(s.ce_weight) for s in samples]  # a source with its own lambda_ce: known answers
        out = chunked_distill_loss(student, teacher, self._unwrapped.lm_head, ids, mask, lambda_kl=t.lambda_kl,
                                   lambda_ce=sum(weights) / len(weights), chunk=t.kl_chunk, teacher_topk=topk,
                                   lambda_order=t.lambda_order, order_margin=t.order_margin,
                                   order_rows=torch.tensor(answered))
        loss, gate = out.loss, None
        if supervise_gate:
            write_mask = torch.zeros_like(attn, dtype=torch.bool)
            for i, s in enumerate(samples):
                if s.write_mask:
                    write_mask[i, :len(s)] = torch.tensor(s.write_mask, dtype=torch.bool)
            gate_loss, log_ratios = write_gate_loss(eta_logits, write_mask, attn.bool() & ~mask.bool(), t.gate_ratio)
            loss = loss + t.lambda_gate * gate_loss
            gate = float(log_ratios.median()) if log_ratios.numel() else None
        transfer_error = needle_error = None
        if transfer:
            # every real row plus, once more, the scored ones (a recall sample's answer: where the window lost most)
            errors = torch.stack([attention_transfer_loss(out_l, target, attn.bool(), baseline)
                                  + attention_transfer_loss(out_l, target, mask.bool(), baseline)
                                  for out_l, target, baseline in layers])
            loss = loss + t.lambda_transfer * errors.mean()
            transfer_error = float(errors.detach().mean())
        if counter is not None:
            with torch.no_grad(), self.accelerator.autocast(), self._layer_targets(True) as counter_layers:
                model(input_ids=counter, attention_mask=attn, use_cache=False, return_hidden=True)
            needle = needle_transfer_loss([o for o, _, _ in layers], [tg for _, tg, _ in layers],
                                          [o for o, _, _ in counter_layers], [tg for _, tg, _ in counter_layers],
                                          mask.bool())
            loss = loss + t.lambda_needle * needle
            needle_error = float(needle.detach())
        return loss, StepResult(float(loss.detach()), out.kl, out.ce, out.tokens, gate_log10_ratio=gate,
                                transfer_error=transfer_error, needle_error=needle_error,
                                order=out.order if t.lambda_order > 0 and any(answered) else None)

    @contextlib.contextmanager
    def _layer_targets(self, capture: bool, window: bool = False):
        """Per converted layer, during one forward: (its output, the pretrained attention on the same
        detached inputs, and with ``window`` its window attention alone: the output less alpha * memory)."""
        collected: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        if not capture:
            yield collected
            return
        memory_out: dict[int, torch.Tensor] = {}

        def keep_memory(module, args, output):
            memory_out[id(module)] = output[0].detach()

        def record(module, args, kwargs, output):
            hidden = (args[0] if args else kwargs["hidden_states"]).detach()
            layer_out, baseline = output[0], None
            with torch.no_grad():
                target = module.teacher_attention(hidden, kwargs["allmem_segment"])
                if window:
                    mem = memory_out.pop(id(module.memory))
                    baseline = layer_out.detach() - (module.alpha.to(mem.dtype) * mem).to(layer_out.dtype)
            collected.append((layer_out, target, baseline))

        layers = [layer.self_attn for layer in self._unwrapped.model.layers]
        hooks = [attn.register_forward_hook(record, with_kwargs=True) for attn in layers]
        if window:
            hooks += [attn.memory.register_forward_hook(keep_memory) for attn in layers]
        try:
            yield collected
        finally:
            for hook in hooks:
                hook.remove()

    def _counterfactual(self, samples: list[Sample]) -> torch.Tensor | None:
        """The batch's ids with another code in every recall sample's needles (``counterfactual_ids``);
        the other samples unchanged. None when no sample has a digit needle."""
        swapped = [counterfactual_ids(s, self.digit_ids) for s in samples]
        if all(ids is None for ids in swapped):
            return None
        counter = [Sample(ids or s.input_ids, s.loss_mask, s.source) for ids, s in zip(swapped, samples)]
        return collate(counter, self.pad_id)[0].to(self.accelerator.device)

    @contextlib.contextmanager
    def _eta_logits(self, capture: bool):
        """Collect every memory's eta-head logits [B, T, H] during one forward, recomputed from the
        head's detached input so that the write-gate loss trains only the heads themselves."""
        collected: list[torch.Tensor] = []
        if not capture:
            yield collected
            return

        def record(module, args, output):
            collected.append(torch.nn.functional.linear(args[0].detach(), module.weight, module.bias))

        hooks = [layer.self_attn.memory.eta_proj.register_forward_hook(record) for layer in self._unwrapped.model.layers]
        try:
            yield collected
        finally:
            for hook in hooks:
                hook.remove()

    def train_step(self) -> StepResult:
        t = self.recipe.train
        runtime = draw_runtime(self.recipe, self.step)
        self._unwrapped.set_runtime(**runtime)
        self.model.train()
        total = StepResult(0.0, 0.0, 0.0, 0)
        sources: set[str] = set()
        for micro in range(t.grad_accum):
            batch = self._micro_batch(self.step, micro)
            sync = micro == t.grad_accum - 1
            ctx = contextlib.nullcontext() if sync else self.accelerator.no_sync(self.model)
            with ctx:
                loss, res = self.loss_on(batch)
                self.accelerator.backward(loss / t.grad_accum)
            total = StepResult(total.loss + res.loss / t.grad_accum, total.kl + res.kl / t.grad_accum,
                               total.ce + res.ce / t.grad_accum, total.tokens + sum(len(s) for s in batch),
                               gate_log10_ratio=res.gate_log10_ratio if res.gate_log10_ratio is not None
                               else total.gate_log10_ratio,
                               transfer_error=res.transfer_error if res.transfer_error is not None
                               else total.transfer_error,
                               needle_error=res.needle_error if res.needle_error is not None else total.needle_error,
                               order=res.order if res.order is not None else total.order)
            sources.update(s.source for s in batch)
        grads = [p.grad for p in self.params.values() if p.grad is not None]
        # one device sync for all gradients (not one per tensor)
        finite = math.isfinite(total.loss) and (
            not grads or bool(torch.stack([g.isfinite().all() for g in grads]).all()))
        if finite:
            if t.grad_clip:
                self.accelerator.clip_grad_norm_(list(self.params.values()), t.grad_clip)
            self.optimizer.step()
        else:  # skip the update; the schedule and the data position still advance (resume stays exact)
            total.skipped = True
            log.warning("step %d: non-finite loss or gradient (loss %s); update skipped", self.step + 1, total.loss)
        self.last_lr = self.scheduler.get_last_lr()[0]  # the lr this step used
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.last_runtime = runtime
        self.last_sources = ",".join(sorted(sources))
        return total

    def _restore_runtime(self) -> None:
        config = self.recipe.allmem_config()
        self._unwrapped.set_runtime(window=config.window, sinks=config.sinks, chunk=config.chunk)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out KL and perplexities at the recipe's own window/sinks/chunk: the trained
        model, the same model with the memory switched off (SWA + sinks), the full-attention
        teacher. Tokens are the scored (response / all-text) tokens. The teacher's hidden
        states and the SWA and full-attention losses do not train: they are computed at the
        first evaluation and reused."""
        model = self._unwrapped
        self._restore_runtime()
        model.eval()
        sums = {"kl": 0.0, "allmem_nll": 0.0, "swa_nll": 0.0, "full_nll": 0.0}
        tokens = 0
        for i, sample in enumerate(self.heldout_samples):
            ids, attn, mask = (x.to(self.accelerator.device) for x in collate([sample], self.pad_id))
            if i == len(self.eval_references):
                teacher = self._teacher_hidden(ids, attn)
                with model.memory_disabled():
                    swa = model(input_ids=ids, attention_mask=attn, use_cache=False, return_hidden=True).hidden_states
                swa_ce = chunked_distill_loss(swa, teacher, model.lm_head, ids, mask, lambda_kl=1, lambda_ce=0).ce
                full_ce = chunked_distill_loss(teacher, teacher, model.lm_head, ids, mask, lambda_kl=1, lambda_ce=0).ce
                self.eval_references.append((teacher, swa_ce, full_ce))
            teacher, swa_ce, full_ce = self.eval_references[i]
            student = model(input_ids=ids, attention_mask=attn, use_cache=False, return_hidden=True).hidden_states
            res = chunked_distill_loss(student, teacher, model.lm_head, ids, mask, lambda_kl=1, lambda_ce=0)
            n = res.tokens
            sums["kl"] += res.kl * n
            sums["allmem_nll"] += res.ce * n
            sums["swa_nll"] += swa_ce * n
            sums["full_nll"] += full_ce * n
            tokens += n
        out = {k: v / max(tokens, 1) for k, v in sums.items()}
        for name in ("allmem", "swa", "full"):
            out[f"{name}_ppl"] = math.exp(out[f"{name}_nll"])
        out["tokens"] = tokens
        out.update(self.recall_margin())
        model.train()
        return out

    def recall_margin(self) -> dict[str, float]:
        """Mean recall margin (nats) on the held-out probe, inside ``evaluate`` (no grad, eval
        mode, the recipe's runtime); SWA + sinks and full attention are measured once (they do
        not train)."""
        if not self.recall_items:
            return {}
        from ..eval.recall import (
            allmem_logits_fn,
            full_attention_logits_fn,
            logits_logprob_fn,
            recall_margins,
            swa_logits_fn,
        )

        model = self._unwrapped
        if not self.reference_margins:
            for name, fn in (("full", full_attention_logits_fn), ("swa", swa_logits_fn)):
                self.reference_margins[f"margin_{name}"] = recall_margins(logits_logprob_fn(fn(model)),
                                                                          self.recall_items).mean
        result = recall_margins(logits_logprob_fn(allmem_logits_fn(model)), self.recall_items)
        return {"margin_allmem": result.mean, "margin_allmem_wins": result.wins, **self.reference_margins}

    # ---------------------------------------------------------------- loop
    def _log(self, record: dict) -> None:
        if not self.accelerator.is_main_process:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        with (self.out / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        writer = self._tensorboard()
        if writer is not None:
            values = record.get("eval", record)
            prefix = "eval" if "eval" in record else "train"
            for key, value in values.items():
                if isinstance(value, (int, float)) and key != "step":
                    writer.add_scalar(f"{prefix}/{key}", value, record["step"])
            writer.flush()

    def _tensorboard(self):
        """A TensorBoard writer under output_dir/tensorboard when tensorboard is installed."""
        if not hasattr(self, "_tb_writer"):
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb_writer = SummaryWriter(str(self.out / "tensorboard"))
            except ImportError:
                self._tb_writer = None
        return self._tb_writer

    def _check_finite_params(self) -> None:
        bad = [n for n, p in self.params.items() if not bool(torch.isfinite(p).all())]
        if bad:
            raise TrainingDiverged(f"{len(bad)} trainable tensors hold non-finite values (e.g. {bad[0]}) at step "
                                   f"{self.step}; nothing was saved; lower train.lr and resume from the last checkpoint")

    def save(self) -> None:
        """A checkpoint through accelerate's save_state: every process takes part. Older ones
        beyond ``train.save_total_limit`` are deleted once the new one is complete."""
        from safetensors import SafetensorError

        self._check_finite_params()  # a checkpoint is never written with non-finite weights
        directory = self.out / "checkpoints"
        try:
            save_checkpoint(directory, self.step, self.params, self.optimizer, self.scheduler,
                            {"recipe": self.recipe.name}, self.accelerator)
        except (OSError, SafetensorError) as exc:  # safetensors reports a full disk as its own error
            last = latest_checkpoint(directory)
            raise CheckpointSaveError(
                f"could not write the checkpoint of step {self.step} under {directory} ({exc}); the run stopped "
                f"and {'nothing was saved yet' if last is None else f'{last} is the newest checkpoint'}: free disk "
                f"space (train.save_total_limit=N keeps only the newest N checkpoints) and rerun with --resume"
            ) from None
        if self.accelerator.is_main_process:
            prune_checkpoints(directory, self.recipe.train.save_total_limit)

    def train(self, stop_after: int | None = None) -> list[StepResult]:
        """Run to ``train.steps`` (or stop after ``stop_after`` more steps, to simulate a kill)."""
        t = self.recipe.train
        results = []
        bar = tqdm(total=t.steps, initial=self.step, desc=f"distill {self.recipe.name}", unit="step",
                   disable=not (self.progress and self.accelerator.is_main_process), dynamic_ncols=True)
        start, tokens_done, ran = time.perf_counter(), 0, 0
        if self.accelerator.is_main_process:
            self._save_recipe()
        while self.step < t.steps:
            if stop_after is not None and ran >= stop_after:
                break
            res = self.train_step()
            ran += 1
            results.append(res)
            tokens_done += res.tokens * self.accelerator.num_processes
            elapsed = time.perf_counter() - start
            rate = tokens_done / elapsed
            bar.update(1)
            bar.set_postfix(loss=f"{res.loss:.4f}", tok_s=f"{rate:.0f}", **{k[0].upper(): v for k, v in self.last_runtime.items()})
            self._log({"step": self.step, "loss": res.loss, "kl": res.kl, "ce": res.ce, "tokens": res.tokens,
                       "source": self.last_sources, "skipped": res.skipped, "tok_s": rate,
                       "lr": self.last_lr, "elapsed_s": self.elapsed_before + elapsed, **self.last_runtime,
                       **({} if res.gate_log10_ratio is None else {"gate_log10_ratio": res.gate_log10_ratio}),
                       **({} if res.transfer_error is None else {"transfer_error": res.transfer_error}),
                       **({} if res.needle_error is None else {"needle_error": res.needle_error}),
                       **({} if res.order is None else {"order": res.order})})
            self.bad_in_a_row = self.bad_in_a_row + 1 if res.skipped else 0
            if self.bad_in_a_row >= t.max_bad_steps:
                bar.close()
                last = latest_checkpoint(self.out / "checkpoints")
                raise TrainingDiverged(
                    f"the loss or gradient was non-finite for {self.bad_in_a_row} steps in a row (up to step {self.step}): "
                    f"the run diverged; the last good checkpoint is {last or 'none'}; lower train.lr "
                    "(or raise train.max_bad_steps) and resume with --resume")
            if t.save_every and self.step % t.save_every == 0:
                self.save()
            if t.eval_every and self.heldout_samples and self.step % t.eval_every == 0:
                self._log({"step": self.step, "eval": self.evaluate()})
        bar.close()
        if self.step >= t.steps:
            self.save()
            if self.accelerator.is_main_process:
                self._restore_runtime()  # the adapter records the recipe's window/sinks/chunk, not the last draw
                self._unwrapped.save_pretrained(self.out / "adapter")
        return results
