"""CUDA paths: compute stream, copy-stream prefetch, no hidden syncs. Skipped without a GPU."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_table_is_torchs, make_loader, make_model, sgd, table_beside
from torch import nn

from asynchat import Callback, LoopState, Trainer

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.anyio,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


async def test_trains_on_cuda_like_on_the_cpu() -> None:
    cpu_model, cuda_model = make_model(seed=1), make_model(seed=1)
    await Trainer(
        cpu_model, make_loader(), sgd, loss_fn=nn.CrossEntropyLoss(), num_epochs=2, device="cpu"
    ).fit()
    state = await Trainer(
        cuda_model, make_loader(), sgd, loss_fn=nn.CrossEntropyLoss(), num_epochs=2, device="cuda"
    ).fit()
    assert state.device.type == "cuda"
    for a, b in zip(cpu_model.parameters(), cuda_model.parameters(), strict=True):
        assert torch.allclose(a, b.cpu(), atol=1e-5)


async def test_the_profiler_records_the_steps_kernels_on_cuda(tmp_path: Path) -> None:
    from asynchat.callbacks import Profiler

    profiler = Profiler(tmp_path, wait=1, warmup=1, active=2)
    trainer = Trainer(
        make_model(), make_loader(), sgd, loss_fn=nn.CrossEntropyLoss(), num_steps=6,
        device="cuda", callbacks=[profiler],
    )  # fmt: skip
    await trainer.fit()
    [trace] = profiler.traces
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(event.get("cat") == "kernel" for event in events)  # the device's own work
    table = table_beside(trace).read_text()
    assert "Self CUDA" in table


@pytest.mark.parametrize("options", [{}, {"record_shapes": True, "profile_memory": True}])
def test_the_profilers_table_has_the_figures_of_torchs_key_averages_on_cuda(
    options: dict[str, bool],
) -> None:
    # The device's kernels and copies are rows of their own and add to the ops that
    # launched them (and their callers); device memory is attributed like the host's.
    model = make_model().cuda()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities, **options) as profile:
        for _ in range(2):
            with torch.profiler.record_function("step"):
                inputs = torch.randn(16, 8).pin_memory().cuda(non_blocking=True)
                model(inputs).sum().backward()
        torch.cuda.synchronize()
    assert_table_is_torchs(profile, by_shapes=bool(options))


async def test_compute_runs_on_its_own_stream_with_batches_already_on_the_device() -> None:
    seen: list[tuple[bool, bool]] = []

    class Look(Callback):
        def on_step_begin(self, state: LoopState) -> None:
            inputs, targets = state.batch
            on_own_stream = torch.cuda.current_stream() != torch.cuda.default_stream()
            seen.append((on_own_stream, inputs.is_cuda and targets.is_cuda))

    await Trainer(
        make_model(),
        make_loader(),
        sgd,
        loss_fn=nn.CrossEntropyLoss(),
        num_epochs=1,
        device="cuda",
        callbacks=[Look()],
    ).fit()
    assert seen and all(own and on_device for own, on_device in seen)


async def test_the_next_loop_runs_on_the_same_thread_and_stream_after_the_hosts_writes() -> None:
    """A reused compute thread orders its stream after work other threads queued since its
    last loop (here: a slow write on the event loop's default stream)."""
    seen: list[tuple[Any, int, torch.Tensor]] = []

    class Look(Callback):
        def on_loop_begin(self, state: LoopState) -> None:
            weight = next(state.model.parameters())
            seen.append((threading.current_thread(), torch.cuda.current_stream().cuda_stream,
                         weight.detach().clone()))  # fmt: skip

    model = make_model().cuda()

    def fit() -> Any:
        return Trainer(model, make_loader(), sgd, loss_fn=nn.CrossEntropyLoss(), num_steps=2,
                       device="cuda", callbacks=[Look()]).fit()  # fmt: skip

    await fit()
    weight = next(model.parameters())
    torch.cuda._sleep(50_000_000)  # on this thread's (default) stream, before the write
    with torch.no_grad():
        weight.fill_(0.5)
    await fit()
    (thread, stream, _), (thread_again, stream_again, read) = seen
    assert thread_again is thread and stream_again == stream
    assert torch.equal(read.cpu(), torch.full_like(read, 0.5).cpu())


async def test_cuda_batches_an_async_source_made_are_waited_for_on_the_compute_stream() -> None:
    # An async source reads on the event loop, whose thread queues on the default stream: the
    # batch's tensors may still be written there when the step reads them on the compute
    # stream, unless the compute stream waits for the read's event.
    from asynchat import Predictor

    async def written_late() -> Any:
        for value in range(4):
            batch = torch.empty(256, 8, device="cuda")
            torch.cuda._sleep(20_000_000)  # the default stream is busy ...
            batch.fill_(float(value))  # ... and writes the batch after it
            yield batch

    predictor = Predictor(nn.Identity(), written_late(), device="cuda")
    outputs = [out async for out in predictor.stream()]
    assert [float(out.mean()) for out in outputs] == [0.0, 1.0, 2.0, 3.0]


class SyncCheckOn(Callback):
    """First callback: from step ``after`` on, any synchronizing CUDA call raises."""

    def __init__(self, after: int = 2) -> None:
        self.after = after
        self.checked = 0

    def on_step_begin(self, state: LoopState) -> None:
        if state.global_step >= self.after:
            torch.cuda.set_sync_debug_mode("error")
            self.checked += 1


class SyncCheckOff(Callback):
    """Last callback: the check ends with each step (the job's final sync is on purpose)."""

    def on_step_end(self, state: LoopState) -> None:
        torch.cuda.set_sync_debug_mode("default")

    def on_loop_end(self, state: LoopState) -> None:
        torch.cuda.set_sync_debug_mode("default")


def sync_free_trainer(kind: str, tmp_path: Path) -> tuple[Trainer, SyncCheckOn]:
    from torchmetrics.classification import MulticlassAccuracy

    from asynchat import BasicBatchProcessor
    from asynchat.callbacks import JSONLinesLogger, MetricUpdater, Progress

    on = SyncCheckOn()
    callbacks: list[Callback] = [on]
    optimizer: Any = sgd
    processor = BasicBatchProcessor(nn.CrossEntropyLoss())
    if kind == "fp16-fused":
        optimizer = lambda m: torch.optim.Adam(m.parameters(), lr=1e-3, fused=True)  # noqa: E731
        processor = BasicBatchProcessor(nn.CrossEntropyLoss(), amp="fp16")
    if kind == "metrics-loggers-progress":
        # Non-syncing settings: no argument validation, micro average (no bincount).
        accuracy = MulticlassAccuracy(3, average="micro", validate_args=False)
        callbacks += [
            MetricUpdater({"accuracy": accuracy}, log_every_n_steps=1000),
            JSONLinesLogger(tmp_path / "log.jsonl", every_n_steps=1),
            Progress(stream=io.StringIO(), every_n_steps=1),
        ]
    callbacks.append(SyncCheckOff())
    trainer = Trainer(make_model(), make_loader(256, 16), optimizer, batch_processor=processor,
                      num_epochs=1, device="cuda", callbacks=callbacks)  # fmt: skip
    return trainer, on


@pytest.mark.filterwarnings("ignore:Synchronization debug mode is a prototype:UserWarning")
@pytest.mark.parametrize("kind", ["plain", "fp16-fused", "metrics-loggers-progress"])
async def test_steady_state_steps_make_no_host_device_sync(kind: str, tmp_path: Path) -> None:
    trainer, on = sync_free_trainer(kind, tmp_path)
    try:
        await trainer.fit()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert on.checked == 16 - 2  # every step after the warm-up ran under the check


DDP_SYNC_JOB = """
import anyio, sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
from conftest import make_loader, make_model, sgd
from test_cuda import SyncCheckOff, SyncCheckOn
from asynchat import DistributedDataParallelTrainer
import warnings; warnings.simplefilter("ignore", UserWarning)
dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{sys.argv[2]}", rank=0, world_size=1)
on = SyncCheckOn()
trainer = DistributedDataParallelTrainer(make_model(), make_loader(256, 16), sgd,
    loss_fn=torch.nn.CrossEntropyLoss(), num_epochs=1, callbacks=[on, SyncCheckOff()])
anyio.run(trainer.fit)
second = DistributedDataParallelTrainer(make_model(), make_loader(256, 16), sgd,
    loss_fn=torch.nn.CrossEntropyLoss(), num_epochs=1)
group = trainer._ranks.group
dist.destroy_process_group()
print("checked", on.checked, "shared", group is not None and second._ranks.group is group)
"""


def test_ddp_single_rank_nccl_steady_state_makes_no_host_device_sync() -> None:
    from asynchat._launch import free_port

    here = str(Path(__file__).resolve().parent)
    done = subprocess.run([sys.executable, "-c", DDP_SYNC_JOB, here, str(free_port())],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    # Every step ran under the check; the second trainer agrees over the first's gloo group
    # (one made per trainer was kept for the life of the process).
    assert done.stdout.split() == ["checked", "14", "shared", "True"]


def test_ranks_forked_from_the_fork_server_train_on_cuda_with_nccl(tmp_path: Path) -> None:
    """``launch`` forks its ranks from a server that imported torch and asynchat: had that
    import initialised CUDA (the driver does not survive a fork), no rank could use it."""
    import rank_jobs

    from asynchat import launch

    launch(rank_jobs.device_report, nprocs=1, args=(str(tmp_path),))
    report = json.loads((tmp_path / "rank0.json").read_text())
    assert report["backend"] == "nccl" and report["device"] == "cuda:0", report
    assert report["parent"] != os.getpid(), "forked from the server, not spawned"
    assert not report["parent_has_libcuda"] and math.isfinite(report["loss"]), report


class SlowLinear(nn.Module):
    """``nn.Linear(8, 3)`` after a GPU sleep of ``cycles`` clock cycles (at ~1 GHz or more,
    20_000_000 is about 20 ms of device time) in every forward."""

    def __init__(self, cycles: int) -> None:
        super().__init__()
        self.cycles = cycles
        self.linear = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch.cuda._sleep(self.cycles)
        return self.linear(x)  # type: ignore[no-any-return]


async def test_the_host_runs_ahead_of_the_device() -> None:
    """With a 20 ms GPU sleep in every step, the host enqueues steps far ahead of the device."""

    host_times: list[float] = []

    class Clock(Callback):
        def on_step_end(self, state: LoopState) -> None:
            host_times.append(time.perf_counter())

    started = time.perf_counter()
    await Trainer(SlowLinear(20_000_000), make_loader(160, 16), sgd,
                  loss_fn=nn.CrossEntropyLoss(), num_epochs=1, device="cuda",
                  callbacks=[Clock()]).fit()  # fmt: skip
    total = time.perf_counter() - started
    # The job's end waits for the device (10 steps x ~20 ms); the host reached step 5 long
    # before the device could have run 5 steps.
    assert total > 0.15
    assert host_times[4] - started < 0.5 * total


async def test_batches_already_on_the_device_are_ordered_before_the_step() -> None:
    def cuda_collate(items: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
        x = torch.stack([x for x, _ in items]).cuda()
        for _ in range(50):  # a slow device-side augmentation on the data thread's stream
            x = x * 1.0001 - 0.0001 * x
        return x, torch.stack([y for _, y in items]).cuda()

    class Stream:
        """Not a DataLoader: read on the data thread, when the step loop asks."""

        def __init__(self, loader: Any) -> None:
            self.loader = loader

        def __iter__(self) -> Any:
            return iter(self.loader)

    data = make_loader(96, 16).dataset
    results = []
    # Read on the compute thread (a DataLoader without workers), on the data thread when
    # asked (a stream), and ahead on the data thread (a list of batches made on this thread).
    for kind in ("DataLoader", "stream", "list"):
        model = make_model(seed=3)
        loader: Any = torch.utils.data.DataLoader(data, batch_size=16, collate_fn=cuda_collate)
        if kind == "stream":
            loader = Stream(loader)
        elif kind == "list":
            loader = list(loader)
        await Trainer(model, loader, sgd, loss_fn=nn.CrossEntropyLoss(), num_epochs=2,
                      device="cuda").fit()  # fmt: skip
        results.append([p.detach().cpu() for p in model.parameters()])
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)


async def test_a_host_batch_is_copied_while_the_last_step_runs() -> None:
    """The copy of batch N+1 from host memory does not wait for step N's kernels (a
    DataLoader without workers is read on the compute thread, whose stream is the compute
    stream: waiting on it would serialize copies and steps)."""

    seen: list[tuple[bool, bool]] = []

    class Look(Callback):
        def on_step_begin(self, state: LoopState) -> None:
            if state.step == 0:
                return
            run = state.loop._run  # type: ignore[attr-defined]
            time.sleep(0.005)  # ample for a 16 x 8 copy, short of a step's device time
            copied = run.stager._copy_stream.query()
            seen.append((copied, torch.cuda.current_stream().query()))

    await Trainer(SlowLinear(50_000_000), make_loader(64, 16), sgd,
                  loss_fn=nn.CrossEntropyLoss(), num_epochs=1, device="cuda",
                  callbacks=[Look()]).fit()  # fmt: skip
    assert len(seen) == 3
    assert not any(compute_done for _, compute_done in seen), "the steps ran too fast"
    assert all(copied for copied, _ in seen), seen


async def test_to_host_and_item_in_async_hooks_see_the_steps_values() -> None:
    from asynchat import to_host

    seen: list[tuple[float, float, float]] = []

    class Look(Callback):
        def on_step_end(self, state: LoopState) -> None:
            torch.cuda._sleep(5_000_000)  # the compute stream is still busy when the hook runs
            self.expected = state.loss.detach() * 1.0  # type: ignore[union-attr]

    class AsyncRead(Callback):
        async def on_step_end(self, state: LoopState) -> None:
            plain = float(await to_host(look.expected))  # no `after`: the loop's stream
            item = look.expected.item()  # blocks the loop (not advised), but is right
            seen.append((plain, item, float(await state.loop.to_host(look.expected))))

    look = Look()
    await Trainer(make_model(), make_loader(), sgd, loss_fn=nn.CrossEntropyLoss(),
                  num_epochs=1, device="cuda", callbacks=[look, AsyncRead()]).fit()  # fmt: skip
    assert len(seen) == 6
    for plain, item, via_loop in seen:
        assert plain == item == via_loop and plain > 0


async def test_one_copy_stream_per_run_across_epochs_and_validation() -> None:
    from asynchat.callbacks import Validation

    streams: set[int] = set()

    class Look(Callback):
        def on_step_begin(self, state: LoopState) -> None:
            stager = state.loop._stager  # type: ignore[attr-defined]
            streams.add(id(stager._copy_stream))

    await Trainer(make_model(), make_loader(), sgd, loss_fn=nn.CrossEntropyLoss(),
                  num_epochs=3, device="cuda",
                  callbacks=[Look(), Validation(make_loader(32, 16), loss_fn=nn.CrossEntropyLoss(),
                                                callbacks=[Look()])]).fit()  # fmt: skip
    assert len(streams) == 1


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
async def test_checkpoint_snapshots_wait_for_every_device(tmp_path: Path) -> None:
    from asynchat.callbacks import Checkpoint, load_checkpoint

    class TwoDevices(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(8, 16).to("cuda:0")
            self.b = nn.Linear(16, 3).to("cuda:1")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.relu(self.a(x)).to("cuda:1")).to("cuda:0")  # type: ignore[no-any-return]

    model = TwoDevices()
    await Trainer(model, make_loader(), sgd, loss_fn=nn.CrossEntropyLoss(), num_epochs=1,
                  device="cuda:0", callbacks=[Checkpoint(tmp_path)]).fit()  # fmt: skip
    saved, _ = load_checkpoint(tmp_path)
    assert torch.equal(saved["model"]["b.weight"], model.b.weight.detach().cpu())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
async def test_data_parallel_trains_a_model_that_scores_itself_as_one_gpu_does() -> None:
    # Its replicas' losses came back as a vector, one per GPU: model_loss refused it.
    from test_model_loss import Labelled, ScoresItself
    from torch.utils.data import DataLoader

    from asynchat import DataParallelTrainer, model_loss

    async def train(cls: Any, **options: Any) -> tuple[nn.Module, LoopState]:
        torch.manual_seed(0)
        model = ScoresItself()
        state = await cls(
            model, DataLoader(Labelled(99), batch_size=16), sgd, loss_fn=model_loss,
            num_epochs=2, **options,
        ).fit()  # fmt: skip
        return model, state

    one, _ = await train(Trainer, device="cuda:0")
    both, state = await train(DataParallelTrainer, device_ids=[0, 1])  # (last: 3, as 2 + 1)
    assert isinstance(state.model, nn.DataParallel)
    assert state.loss is not None and state.loss.dim() == 0
    for a, b in zip(one.parameters(), both.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


STICKY_ERROR_JOB = """
import anyio, sys, torch
sys.path.insert(0, sys.argv[1])
from conftest import make_model, sgd
from asynchat import Trainer
x = torch.randn(32, 8)
y = torch.full((32,), 7)  # out of range for 3 classes: a device-side assert
loader = [(x, y)] * 4
trainer = Trainer(make_model(), loader, sgd, loss_fn=torch.nn.CrossEntropyLoss(), num_epochs=1,
                  device="cuda")
try:
    anyio.run(trainer.fit)
except RuntimeError as exc:
    print("raised", trainer.status)
"""


def test_a_sticky_cuda_error_reaches_fit_instead_of_hanging() -> None:
    here = str(Path(__file__).resolve().parent)
    done = subprocess.run([sys.executable, "-c", STICKY_ERROR_JOB, here], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.stdout.strip() == "raised failed", done.stderr


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
async def test_two_named_optimizers_step_on_cuda_with_mixed_precision(amp: str) -> None:
    """The step API on the GPU: two updates a step under autocast; with fp16 one grad
    scaler for both, its scale updated once per step."""
    from test_optimizers import TwoHeads, TwoUpdates

    processor = TwoUpdates(amp=amp)  # type: ignore[arg-type]
    model = TwoHeads()
    before = [p.detach().clone() for p in model.parameters()]
    state = await Trainer(
        model, make_loader(96, 16),
        {"a": lambda m: torch.optim.SGD(m.a.parameters(), lr=0.1),
         "b": lambda m: torch.optim.Adam(m.b.parameters(), lr=0.01, fused=True)},
        batch_processor=processor, num_steps=6, device="cuda",
    ).fit()  # fmt: skip
    assert all(not torch.equal(a, b.cpu()) for a, b in zip(before, model.parameters(), strict=True))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert state.losses["a"].is_cuda and state.losses["b"].is_cuda
    if amp == "fp16":
        assert processor.scaler is not None
        assert processor.scaler._growth_tracker.item() == 6  # type: ignore[attr-defined]


@pytest.mark.parametrize("step", ["eager", "cuda-graphs"])
async def test_the_character_lm_example_learns_on_cuda_in_bf16(tmp_path: Path, step: str) -> None:
    """The example as it runs on a GPU (bf16 autocast, sampling with a CUDA generator),
    eager and with --cuda-graphs (validation and sampling eager between replays)."""
    from conftest import load_example

    charlm = load_example("charlm.py")
    corpus = charlm.Corpus.load(max_chars=300_000)
    run = charlm.Run(steps=120, layers=2, width=64, warmup=20, eval_every=60, val_batches=8)
    trainer = charlm.make_trainer(corpus, run, tmp_path, progress=False, step=step)
    assert trainer.batch_processor.amp == "bf16"
    state = await trainer.fit()
    assert state.metrics["val/loss"] < corpus.unigram_loss() - 0.4
    (published,) = [c for c in trainer.callbacks if isinstance(c, charlm.PublishSamples)]
    assert len(published.samples) == 2
