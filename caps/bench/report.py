"""
What C{python -m caps.bench} does with its measurements: percentiles,
ratios to the relay floor, medians over runs, a description of the
machine, the tables on standard output, the progress bar on standard
error, and the chart.
"""

import contextlib
import math
import os
import platform
import shutil
import statistics
import sys
import time


def percentile(values, fraction):
    """
    The nearest-rank percentile: the smallest value with at least
    C{fraction} of C{values} at or below it.
    """
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def machine():
    """
    What the figures were measured on.
    """
    from importlib import metadata

    import caps

    versions = {"caps": caps.__version__}
    for package in ("twisted", "msgspec", "orjson", "matplotlib"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    info = {
        "cpus": os.cpu_count(),
        "cpu_model": None,
        "memory_bytes": None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "versions": versions,
    }
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            models = [
                line.split(":", 1)[1].strip()
                for line in f
                if line.startswith("model name")
            ]
        info["cpu_model"] = models[0] if models else None
    with contextlib.suppress(OSError):
        with open("/proc/meminfo") as f:
            info["memory_bytes"] = int(f.readline().split()[1]) * 1024
    return info


def add_ratios(rows, relays):
    """
    Give each throughput row its ratios to the fastest relay among
    C{rows}: C{cpu_vs_relay} (broker CPU per message over the lowest
    relay's) and C{throughput_vs_relay} (messages a second over the
    highest relay's).  CPU time is counted in nanoseconds where the kernel
    keeps them, in 10 ms ticks elsewhere: a tiny run may show none, and no
    ratio.
    """
    floors = [row for row in rows if row["store"] in relays]
    cpu = min((r["broker_cpu_us_per_msg"] for r in floors), default=0)
    rate = max((r["msgs_per_s"] for r in floors), default=0)
    for row in rows:
        row["cpu_vs_relay"] = row["broker_cpu_us_per_msg"] / cpu if cpu > 0 else None
        row["throughput_vs_relay"] = row["msgs_per_s"] / rate if rate > 0 else None


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def median_rows(runs):
    """
    Merge the rows of several runs (one list per run, the same stores in
    the same order) into one row per store: the median of each figure.
    """
    merged = []
    for rows in zip(*runs, strict=True):
        row = {}
        for key in rows[0]:
            values = [r[key] for r in rows]
            numbers = [v for v in values if _number(v)]
            if numbers and len(numbers) == len([v for v in values if v is not None]):
                row[key] = statistics.median(numbers)
            else:
                row[key] = values[0]
        merged.append(row)
    return merged


def _cell(value, style):
    if value is None:
        return "-"
    if style is None or not _number(value):
        return str(value)
    return style.format(value)


def table(rows, columns):
    """
    Rows as an aligned text table: C{columns} is a list of (header, key,
    format); the first column is aligned left, the others right.
    """
    cells = [[header for header, _, _ in columns]]
    cells += [[_cell(row.get(key), style) for _, key, style in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join(
        "  ".join(
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for line in cells
    )


MB = "{:,.1f}"
COLUMNS = {
    "throughput": [
        ("store", "store", None),
        ("msgs/s", "msgs_per_s", "{:,.0f}"),
        ("broker CPU µs/msg", "broker_cpu_us_per_msg", "{:,.1f}"),
        ("Redis CPU µs/msg", "store_cpu_us_per_msg", "{:,.1f}"),
        ("CPU vs relay (x)", "cpu_vs_relay", "{:,.2f}"),
        ("msgs/s vs relay (x)", "throughput_vs_relay", "{:,.2f}"),
    ],
    "latency": [
        ("store", "store", None),
        ("p50 ms", "p50_ms", "{:,.2f}"),
        ("p90 ms", "p90_ms", "{:,.2f}"),
        ("p99 ms", "p99_ms", "{:,.2f}"),
        ("p99.9 ms", "p99_9_ms", "{:,.2f}"),
        ("max ms", "max_ms", "{:,.2f}"),
        ("confirm p50 ms", "confirm_p50_ms", "{:,.2f}"),
        ("confirm p99 ms", "confirm_p99_ms", "{:,.2f}"),
        ("sent msgs/s", "achieved_rate", "{:,.0f}"),
    ],
    "drain": [
        ("store", "store", None),
        ("publish msgs/s", "publish_msgs_per_s", "{:,.0f}"),
        ("drain msgs/s", "drain_msgs_per_s", "{:,.0f}"),
        ("drain CPU µs/msg", "drain_cpu_us_per_msg", "{:,.1f}"),
        ("Redis µs/msg", "drain_store_cpu_us_per_msg", "{:,.1f}"),
        ("RSS before MB", "rss_before_mb", MB),
        ("RSS queued MB", "rss_queued_mb", MB),
        ("B/queued msg", "bytes_per_queued_msg", "{:,.0f}"),
    ],
    "connections": [
        ("store", "store", None),
        ("connections", "connections", "{:,.0f}"),
        ("open s", "seconds_to_open", "{:,.2f}"),
        ("RSS before MB", "rss_before_mb", MB),
        ("RSS open MB", "rss_open_mb", MB),
        ("B/connection", "bytes_per_connection", "{:,.0f}"),
    ],
    "scaling": [
        ("store", "store", None),
        ("messages", "messages", "{:,.0f}"),
        ("msgs/s", "msgs_per_s", "{:,.0f}"),
        ("wall µs/msg", "wall_us_per_msg", "{:,.1f}"),
        ("broker CPU µs/msg", "broker_cpu_us_per_msg", "{:,.1f}"),
        ("peak RSS MB", "peak_rss_mb", MB),
    ],
}


def titles(settings):
    """
    Each section's title, with the settings it was measured with.
    """
    s = settings
    runs = f"; median of {s['runs']} runs" if s["runs"] > 1 else ""
    return {
        "throughput": f"Throughput: {s['messages']:,} messages, up to {s['window']:,} "
        f"unconfirmed, every one acknowledged{runs}",
        "latency": f"Latency, publish to delivery: {s['latency_messages']:,} messages "
        f"at {s['rate']:,} msgs/s{runs}",
        "drain": f"Catch-up: a backlog of {s['backlog']:,} messages published with "
        f"no consumer, then drained{runs}",
        "connections": f"Connections: {s['connections']:,} idle subscribers{runs}",
        "scaling": f"Scaling: memory store, throughput at each size{runs}",
    }


def render(report):
    """
    The whole report as text for people.
    """
    parts = []
    names = titles(report["settings"])
    for section, columns in COLUMNS.items():
        if report.get(section):
            parts.append(names[section])
            parts.append(table(report[section], columns))
            parts.append("")
    parts += [f"note: {note}" for note in report["notes"]]
    return "\n".join(parts).rstrip() + "\n"


class Progress:
    """
    A progress bar on C{stream} (standard error): redrawn in place on a
    terminal, one line per step otherwise (a log, a CI job).
    """

    def __init__(self, total, stream=None, width=24, clock=time.monotonic):
        self.total = total
        self.stream = stream or sys.stderr
        self.width = width
        self.clock = clock
        self.started = clock()
        self.done = 0
        self.tty = self.stream.isatty()

    def step(self, label):
        """
        Say that the next step, C{label}, begins.
        """
        self._show(label)
        self.done += 1

    def finish(self):
        self._show("done")
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def _show(self, label):
        elapsed = int(self.clock() - self.started)
        filled = self.width * self.done // max(1, self.total)
        line = (
            f"[{'#' * filled}{'.' * (self.width - filled)}] "
            f"{self.done}/{self.total} {elapsed // 60}:{elapsed % 60:02d} {label}"
        )
        if self.tty:
            columns = shutil.get_terminal_size().columns - 1
            self.stream.write("\r" + line[:columns].ljust(columns))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def chart(path, report, samples, relays):
    """
    Draw the chart to C{path} (PNG): on the left each store's latency by
    percentile (C{samples}: nanoseconds, by store), on the right each
    store's end-to-end throughput, with the relay floors.  Needs
    matplotlib (the C{bench} extra).
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot, ticker

    settings = report["settings"]
    figure, (left, right) = pyplot.subplots(
        1, 2, figsize=(13, 5.5), gridspec_kw={"width_ratios": [1.2, 1]}
    )
    # Latency by percentile: x is 1 / (1 - p) on a log scale, so that each
    # step to the right is one more nine (90%, 99%, 99.9%).
    most = 2
    for store, values in samples.items():
        if not values:
            continue
        ordered = sorted(values)
        n = len(ordered)
        most = max(most, n)
        left.step(
            [n / (n - i) for i in range(n)],
            [v / 1e6 for v in ordered],
            where="post",
            linestyle=":" if store in relays else "-",
            linewidth=1.5,
            label=store,
        )
    nines = [1, 2, 10, 100, 1000, 10_000, 100_000]
    labels = ["0%", "50%", "90%", "99%", "99.9%", "99.99%", "99.999%"]
    shown = [x for x in nines if x <= most]
    left.set_xscale("log")
    left.set_xlim(1, most)
    left.xaxis.set_major_locator(ticker.FixedLocator(shown))
    left.xaxis.set_major_formatter(ticker.FixedFormatter(labels[: len(shown)]))
    left.xaxis.set_minor_locator(ticker.NullLocator())
    left.set_yscale("log")
    left.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    left.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    left.yaxis.set_minor_formatter(ticker.NullFormatter())
    left.set_xlabel("percentile of messages (log scale of 1 / (1 - p))")
    left.set_ylabel("publish to delivery, ms (log scale)")
    left.set_title(f"Latency at a steady {settings['rate']:,} msgs/s")
    left.grid(True, which="both", alpha=0.3)
    left.legend(loc="upper left", fontsize="small")

    rows = report["throughput"][::-1]
    names = [row["store"] for row in rows]
    rates = [row["msgs_per_s"] for row in rows]
    colours = ["#999999" if name in relays else "#3a7bd5" for name in names]
    bars = right.barh(names, rates, color=colours)
    for bar, row in zip(bars, rows, strict=True):
        right.annotate(
            f" {row['msgs_per_s']:,.0f} ({row['broker_cpu_us_per_msg']:.1f} µs/msg)",
            (bar.get_width(), bar.get_y() + bar.get_height() / 2),
            va="center",
            fontsize="small",
        )
    right.set_xlim(0, max(rates, default=1) * 1.45)
    right.xaxis.set_major_locator(ticker.MaxNLocator(6))
    right.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v / 1000:g}k"))
    right.set_xlabel("end-to-end msgs/s (broker CPU per message in brackets)")
    right.set_title(
        f"Throughput, {settings['messages']:,} messages (grey: relay floors)"
    )
    right.grid(True, axis="x", alpha=0.3)
    machine = report["machine"]
    figure.suptitle(
        f"python -m caps.bench: {machine['cpus']} CPUs, "
        f"{machine['implementation']} {machine['python']}",
        fontsize="medium",
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)
