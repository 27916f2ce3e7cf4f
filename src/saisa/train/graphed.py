"""One training step (forward, loss, backward, optimizer step) captured as a CUDA graph and replayed per micro-batch.

Unusual here: saisa's stage-2 step is near launch-bound on an H100. At the bench's Qwen2-1.5B shape and micro-batch
16 it launches about 4.9k kernels, whose launches took the host ~113 ms at best against ~144 ms of GPU work
(benchmarks/results/train-variance-h100), so every slow host step shows. Replayed as one graph, the step costs the
host one launch. What that asks of the step:
- fixed shapes: every micro-batch has the first one's shapes (pad to one length, the same number of images);
- no host synchronisation inside it: the batch's layout (naavit.build_layout) is built from host copies of input_ids
  and attention_mask, then copied into static buffers with the inputs;
- a capturable optimizer (torch's AdamW with capturable=True, fused or foreach): its step count stays on the device,
  and its learning rates become device tensors (a float would be frozen into the graph), so that a scheduler's
  changes, which torch's schedulers write into such a tensor in place, reach every replay;
- gradients that stay where they are: allocated once, inside the capture, from the graph's memory pool; every replay
  writes them afresh (no accumulation across calls; p.grad holds the last step's gradients, as after an eager step).
Every call is one real step on its own batch: the first `warmup` calls run eagerly on a side stream (lazy set-up:
BLAS workspaces, the optimizer's state), the next one captures the step and replays it.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from saisa.model.graphs import capture_graph, on_side_stream
from saisa.model.naavit import SequenceLayout

INPUTS = ("input_ids", "attention_mask", "labels", "pixel_values", "image_features")


def capturable(optimizer: torch.optim.Optimizer) -> bool:
    """Whether every parameter group of `optimizer` may be stepped inside a CUDA graph."""
    return all(group.get("capturable", False) for group in optimizer.param_groups)


class GraphedTrainStep:
    """`step(**batch)`: one training step of `model` on a micro-batch, replayed from a CUDA graph after `warmup` calls.

    model: a saisa model in training mode (its `forward` takes `layout=`); optimizer: capturable, over the trained
    parameters; max_grad_norm: clip the gradients' total norm (torch.nn.utils.clip_grad_norm_) before the step.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, warmup: int = 2,
                 max_grad_norm: float | None = None) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError("GraphedTrainStep needs a CUDA device; on CPU call the model and optimizer directly")
        if not capturable(optimizer):
            raise ValueError("the optimizer cannot step inside a CUDA graph: build it with capturable=True, e.g. "
                             "torch.optim.AdamW(params, fused=True, capturable=True)")
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (the optimizer's state is created eagerly), got {warmup}")
        self.model, self.optimizer, self.warmup, self.max_grad_norm = model, optimizer, warmup, max_grad_norm
        self.device = model.get_input_embeddings().weight.device
        for group in optimizer.param_groups:
            if not isinstance(group["lr"], torch.Tensor):
                group["lr"] = torch.tensor(float(group["lr"]), device=self.device)
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: dict[str, torch.Tensor] = {}
        self.layout: SequenceLayout | None = None
        self.loss: torch.Tensor | None = None
        self.grad_norm: torch.Tensor | None = None  # of the last step, when clipping

    def _params(self) -> Iterator[nn.Parameter]:
        return (p for group in self.optimizer.param_groups for p in group["params"])

    def _run(self) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.model(**self.static, layout=self.layout).loss
        loss.backward()
        if self.max_grad_norm is not None:
            self.grad_norm = nn.utils.clip_grad_norm_(list(self._params()), self.max_grad_norm, foreach=True)
        self.optimizer.step()
        return loss.detach()

    def _load(self, batch: dict[str, torch.Tensor]) -> None:
        """Copy the batch and its layout into the static buffers (created on the first call)."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        features = batch.get("image_features")
        images = batch.get("pixel_values") if features is None else features
        v = None if features is None else features.shape[1]
        layout = self.model.layout(ids.cpu(), mask.cpu(), 0 if images is None else images.shape[0], v)
        if not self.static:
            self.static = {k: t.to(self.device).clone() for k, t in batch.items()}
            self.layout = layout  # on the model's device (model.layout moves it there)
            return
        shapes = {k: tuple(t.shape) for k, t in batch.items()}
        expected = {k: tuple(t.shape) for k, t in self.static.items()}
        if shapes != expected:
            raise ValueError(f"a CUDA-graphed step takes micro-batches of one shape: this one has {shapes}, the graph "
                             f"{expected}; pad every batch to the same length with the same number of images")
        for k, t in batch.items():
            self.static[k].copy_(t, non_blocking=True)
        for name in SequenceLayout.__dataclass_fields__:
            new, old = getattr(layout, name), getattr(self.layout, name)
            if (new is None) != (old is None) or (new is not None and new.shape != old.shape):
                raise ValueError(f"this micro-batch's layout ({name}) differs in shape from the graph's: give every "
                                 "sample the same number of images (and of placeholders per row)")
            if new is not None:
                old.copy_(new, non_blocking=True)

    def __call__(self, *, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 pixel_values: torch.Tensor | None = None, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """One optimizer step on this micro-batch (host or device tensors); returns its loss (a device scalar)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        batch = {k: t for k, t in zip(INPUTS, (input_ids, attention_mask, labels, pixel_values, image_features))
                 if t is not None}
        self._load(batch)
        if self.calls < self.warmup:
            self.loss = on_side_stream(self._run, torch.cuda.Stream(self.device))
        else:
            if self.graph is None:
                torch.cuda.empty_cache()  # the eager steps' cached blocks, so that the graph's pool can take them
                self.graph, self.loss = capture_graph(self._run, warmup=0)
            self.graph.replay()
        self.calls += 1
        return self.loss.clone()
