"""The Profiler's table of ops: the figures of torch's ``key_averages().table()``, computed
from the recorded events themselves.

``key_averages()`` first builds a Python object (a ``FunctionEvent``, with its lists and
ranges) for every recorded event: tens of thousands for a few steps of a small model. That
many new objects set off the garbage collector's full passes, each of which holds the GIL
while it walks every object of the process, so the event loop stood still for 160-700 ms at
a time while a table was made (``benchmarks/loop_pauses.py --jobs profile``). Here each
event is read once (torch's event objects are not tracked by the collector) into lists of
numbers, and the only objects kept are one row per op.

The figures are torch's, computed the same way (``tests/test_profiler.py`` checks them
against ``key_averages()``): an op's CPU time is its span on its thread, and its self time
leaves out the spans of the ops nested in it there; an op whose only nested op has its name
(a redispatch) counts once; a device event (a kernel, a copy) is a row of its own and adds
its time to the op that launched it, and through it to that op's callers; the memory
allocated within an op's span is its memory, and allocations outside every op are
``[memory]``'s.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch.profiler import DeviceType

MEMORY = "[memory]"
_UNLISTED = frozenset({  # the profiler's own entries and ops too small to show (torch's list)
    MEMORY, "[OutOfMemory]", "profiler::_record_function_enter",
    "profiler::_record_function_enter_new", "profiler::_record_function_exit",
    "aten::is_leaf", "aten::output_nr", "aten::_version",
})  # fmt: skip
_HOST_MEMORY = (DeviceType.CPU, DeviceType.MKLDNN, DeviceType.IDEEP)
_DEVICE_MEMORY = (DeviceType.CUDA, DeviceType.PrivateUse1, DeviceType.HIP, DeviceType.XPU)
_KERNELS = (DeviceType.CUDA, DeviceType.PrivateUse1, DeviceType.XPU)  # add to their op

Key = tuple[str, str, str]  # (name, kind, input shapes or ""); the kinds: "op" and
# "annotation" (a ``record_function``) on the host; on a device its type's name ("CUDA"), or
# that and " annotation"


@dataclass
class Row:
    """One row of the table: the events of one key, in nanoseconds and bytes."""

    calls: int = 0
    self_cpu: int = 0
    cpu: int = 0
    self_device: int = 0
    device: int = 0
    self_cpu_memory: int = 0
    cpu_memory: int = 0
    self_device_memory: int = 0
    device_memory: int = 0


@dataclass
class _Ops:
    """The host events of a recording (ops, annotations, device runtime calls), one entry
    per event in each list."""

    keys: list[Key] = field(default_factory=list)
    start: list[int] = field(default_factory=list)
    end: list[int] = field(default_factory=list)
    thread: list[int] = field(default_factory=list)
    nests: list[bool] = field(default_factory=list)  # synchronous: it nests, has self time
    parent: list[int] = field(default_factory=list)  # -1: at the top of its thread
    children: list[int] = field(default_factory=list)
    listed: list[bool] = field(default_factory=list)  # False: merged into its parent
    kernels: list[int] = field(default_factory=list)  # ns of the device events it launched
    device: list[int] = field(default_factory=list)  # those and its children's
    order: list[int] = field(default_factory=list)  # the nesting ones, parents first


def op_rows(events: Sequence[Any], *, by_shapes: bool = False) -> dict[Key, Row]:
    """The table's rows of ``events`` (a recording's ``kineto_results.events()``), keyed
    by name, kind and (``by_shapes``) input shapes."""
    ops, launched, on_device, memory = _read(events, by_shapes)
    _nest(ops)
    _merge_redispatches(ops)
    for op, nanoseconds in launched:
        ops.kernels[op] += nanoseconds
    _sum_device_time(ops)
    rows: dict[Key, Row] = {}
    _add_ops(rows, ops, _Memory(memory), by_shapes)
    for event in on_device:
        row = rows.setdefault(_key(event, by_shapes), Row())
        row.calls += 1
        if not _is_async(event):
            row.self_device += event.duration_ns()
            row.device += event.duration_ns()
    return rows


def _key(event: Any, by_shapes: bool) -> Key:
    name: str = event.name()
    if name.startswith("ProfilerStep#"):
        name = "ProfilerStep*"
    device = event.device_type()
    annotation = event.is_user_annotation()
    if device == DeviceType.CPU:
        kind = "annotation" if annotation else "op"
    else:
        kind = f"{device.name} annotation" if annotation else device.name
    return name, kind, str(event.shapes()) if by_shapes else ""


def _listed(event: Any) -> bool:
    return event.name() not in _UNLISTED and not getattr(event, "is_hidden_event", bool)()


def _is_async(event: Any) -> bool:
    return bool(event.is_async()) or event.start_thread_id() != event.end_thread_id()


def _read(
    events: Sequence[Any], by_shapes: bool
) -> tuple[_Ops, list[tuple[int, int]], list[Any], list[Any]]:
    """In one pass: the host events; (op, ns) for each device event an op launched; the
    device events; and the memory records."""
    ops, op_of = _Ops(), {}
    runtime: list[tuple[int, int]] = []  # (host event, correlation id of its op)
    kernels: list[tuple[int, int]] = []  # (ns, correlation id of its op)
    on_device, memory = [], []
    for event in events:
        if event.name() == MEMORY:
            memory.append(event)
            continue
        if not _listed(event):
            continue
        link, device = event.linked_correlation_id(), event.device_type()
        if device != DeviceType.CPU:
            on_device.append(event)
            if device in _KERNELS:
                kernels.append((event.duration_ns(), link))
            continue
        nests = not _is_async(event)
        if nests and link == 0:
            op_of[event.correlation_id()] = len(ops.keys)
        elif link:
            runtime.append((len(ops.keys), link))
        ops.keys.append(_key(event, by_shapes))
        ops.start.append(event.start_ns())
        ops.end.append(event.end_ns())
        ops.thread.append(event.start_thread_id())
        ops.nests.append(nests)
    for index, link in runtime:  # a runtime call nests in the op that made it
        if link in op_of:
            ops.thread[index] = ops.thread[op_of[link]]
    launched = [(op_of[link], ns) for ns, link in kernels if link in op_of]
    return ops, launched, on_device, memory


def _nest(ops: _Ops) -> None:
    """Each synchronous event's parent: the innermost one of its thread whose span holds
    its own (a span only partly inside another is not nested in it)."""
    count = len(ops.keys)
    ops.parent, ops.children, ops.listed = [-1] * count, [0] * count, [True] * count
    ops.kernels, ops.device = [0] * count, [0] * count
    ops.order = sorted(
        (i for i in range(count) if ops.nests[i]),
        key=lambda i: (ops.thread[i], ops.start[i], -ops.end[i]),
    )
    open_: list[int] = []
    for i in ops.order:
        while open_ and (
            ops.thread[open_[-1]] != ops.thread[i]
            or ops.start[i] >= ops.end[open_[-1]]
            or ops.end[i] > ops.end[open_[-1]]
        ):
            open_.pop()
        if open_:
            ops.parent[i] = open_[-1]
            ops.children[open_[-1]] += 1
        open_.append(i)


def _merge_redispatches(ops: _Ops) -> None:
    """An event whose parent has its name and no other child is merged into the parent:
    counted once, its children and the kernels it launched the parent's."""
    for i in ops.order:  # (a parent is merged, or not, before its children are seen)
        parent = ops.parent[i]
        while parent >= 0 and not ops.listed[parent]:
            parent = ops.parent[parent]
        ops.parent[i] = parent
        if parent >= 0 and ops.keys[parent][0] == ops.keys[i][0] and ops.children[parent] == 1:
            ops.listed[i] = False
            ops.children[parent] = ops.children[i]


def _sum_device_time(ops: _Ops) -> None:
    """Each event's device time: the kernels it launched and its children's device time."""
    for i in ops.order:
        if not ops.listed[i]:  # (its parent is listed: merged parents come first)
            ops.kernels[ops.parent[i]] += ops.kernels[i]
            ops.kernels[i] = 0
    for i in reversed(ops.order):  # children before their parents
        ops.device[i] += ops.kernels[i]
        if ops.parent[i] >= 0 and ops.listed[i]:
            ops.device[ops.parent[i]] += ops.device[i]


class _Memory:
    """The memory records in time order, with running sums of the bytes allocated on the
    host and on a device, to sum those within a span."""

    def __init__(self, records: list[Any]) -> None:
        records.sort(key=lambda record: record.start_ns())
        self.times = [record.start_ns() for record in records]
        self.host, self.device = [0], [0]
        for record in records:
            kind, size = record.device_type(), record.nbytes()
            self.host.append(self.host[-1] + (size if kind in _HOST_MEMORY else 0))
            self.device.append(self.device[-1] + (size if kind in _DEVICE_MEMORY else 0))
        self.inside = [False] * len(records)  # in the span of a host event

    def within(self, start: int, end: int) -> tuple[int, int]:
        """The bytes allocated from ``start`` to ``end`` (both included) on the host and
        on a device."""
        first, last = bisect_left(self.times, start), bisect_right(self.times, end)
        self.inside[first:last] = [True] * (last - first)
        return self.host[last] - self.host[first], self.device[last] - self.device[first]

    def outside(self, record: int) -> tuple[int, int]:
        host = self.host[record + 1] - self.host[record]
        return host, self.device[record + 1] - self.device[record]


def _add_ops(rows: dict[Key, Row], ops: _Ops, memory: _Memory, by_shapes: bool) -> None:
    """Each listed host event summed into its row, its memory (that of its span) less its
    children's for the self figures; the allocations outside every op into ``[memory]``."""
    count = len(ops.keys)
    host, device = [0] * count, [0] * count
    for i in range(count) if memory.times else ():
        host[i], device[i] = memory.within(ops.start[i], ops.end[i])
    children_time, children_host, children_device = [0] * count, [0] * count, [0] * count
    for i in ops.order:
        parent = ops.parent[i]
        if parent >= 0 and ops.listed[i]:
            children_time[parent] += ops.end[i] - ops.start[i]
            children_host[parent] += host[i]
            children_device[parent] += device[i]
    for i in range(count):
        if ops.listed[i]:
            row = rows.setdefault(ops.keys[i], Row())
            row.calls += 1
            row.cpu += ops.end[i] - ops.start[i]
            row.cpu_memory += host[i]
            row.device_memory += device[i]
            if ops.nests[i]:  # (an asynchronous event has no self figures nor device time)
                row.self_cpu += ops.end[i] - ops.start[i] - children_time[i]
                row.device += ops.device[i]
                row.self_device += ops.kernels[i]
                row.self_cpu_memory += host[i] - children_host[i]
                row.self_device_memory += device[i] - children_device[i]
    for record, inside in enumerate(memory.inside):
        if not inside:
            row = rows.setdefault((MEMORY, "op", "[]" if by_shapes else ""), Row())
            row.calls += 1
            allocated = memory.outside(record)
            row.cpu_memory += allocated[0]
            row.self_cpu_memory += allocated[0]
            row.device_memory += allocated[1]
            row.self_device_memory += allocated[1]


def table(rows: dict[Key, Row], *, limit: int, device: str | None = None) -> str:
    """``rows`` as a text table like torch's: the ``limit`` rows with the most self time on
    ``device`` (the name of its type, e.g. ``"cuda"``) if given, else on the CPU."""
    shown = _Columns(rows, device)

    def by_self_time(item: tuple[Key, Row]) -> tuple[float, str, str]:
        (name, _, shape), row = item
        return -(row.self_device if shown.device_time else row.self_cpu), name, shape

    first = sorted(rows.items(), key=by_self_time)[:limit]
    footer = [f"Self CPU time total: {_time(shown.total_cpu)}"]
    if shown.device_time:
        footer.append(f"Self {shown.device} time total: {_time(shown.total_device)}")
    return _layout(shown.names, [shown.cells(*item) for item in first]) + "\n".join(footer) + "\n"


class _Columns:
    """The table's columns: device time, memory and input shapes where recorded."""

    def __init__(self, rows: dict[Key, Row], device: str | None) -> None:
        values = rows.values()
        self.device = (device or "device").upper()
        self.device_time = device is not None and any(row.self_device for row in values)
        self.memory = any(row.cpu_memory for row in values)
        self.device_memory = any(row.device_memory for row in values)
        self.shapes = any(shapes for _, _, shapes in rows)
        self.total_cpu = sum(row.self_cpu for row in values)
        self.total_device = sum(  # (a device's annotations span its other events)
            row.self_device
            for (_, kind, _), row in rows.items()
            if kind not in ("op", "annotation") and not kind.endswith(" annotation")
        )
        names = ["Name", "Self CPU %", "Self CPU", "CPU total %", "CPU total", "CPU time avg"]
        on = self.device
        if self.device_time:
            names += [f"Self {on}", f"Self {on} %", f"{on} total", f"{on} time avg"]
        names += ["CPU Mem", "Self CPU Mem"] if self.memory else []
        names += [f"{on} Mem", f"Self {on} Mem"] if self.device_memory else []
        self.names = names + ["# of Calls"] + (["Input Shapes"] if self.shapes else [])

    def cells(self, key: Key, row: Row) -> list[str]:
        name, _, shapes = key
        total = self.total_cpu
        cells = [_short(name, 60), _share(row.self_cpu, total), _time(row.self_cpu),
                 _share(row.cpu, total), _time(row.cpu), _time(row.cpu / row.calls)]  # fmt: skip
        if self.device_time:
            cells += [_time(row.self_device), _share(row.self_device, self.total_device),
                      _time(row.device), _time(row.device / row.calls)]  # fmt: skip
        if self.memory:
            cells += [_bytes(row.cpu_memory), _bytes(row.self_cpu_memory)]
        if self.device_memory:
            cells += [_bytes(row.device_memory), _bytes(row.self_device_memory)]
        return cells + [str(row.calls)] + ([_short(shapes, 80)] if self.shapes else [])


def _layout(columns: list[str], lines: list[list[str]]) -> str:
    widths = [max([len(column)] + [len(cells[i]) for cells in lines]) for i, column in
              enumerate(columns)]  # fmt: skip
    rule = "  ".join("-" * width for width in widths)

    def line(cells: list[str]) -> str:  # names and shapes to the left, figures to the right
        aligned = [
            cell.ljust(width) if column in ("Name", "Input Shapes") else cell.rjust(width)
            for cell, width, column in zip(cells, widths, columns, strict=True)
        ]
        return "  ".join(aligned).rstrip()

    return "\n".join([rule, line(columns), rule, *map(line, lines), rule, ""])


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _share(part: int, whole: int) -> str:
    return f"{100 * part / whole:.2f}%" if whole else "0.00%"


def _time(nanoseconds: float) -> str:
    for unit, size in (("s", 1e9), ("ms", 1e6)):
        if abs(nanoseconds) >= size:
            return f"{nanoseconds / size:.3f}{unit}"
    return f"{nanoseconds / 1e3:.3f}us"


def _bytes(size: int) -> str:
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if abs(size) >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{size} B"
