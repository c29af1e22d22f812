"""A read-only status page of the fleet (`serve --http-port`): devices, rounds, accuracy over
time and rejections, rendered from the aggregator's SQLite state on every request.

Plain HTML with inline SVG charts: no JavaScript, no external assets (a pilot site's network
may reach nothing else), refreshed by the browser every 15 s. Only GET; everything a device
sent (ids, reasons) is HTML-escaped. `/status.json` serves the same facts for scripts.
"""

from __future__ import annotations

import html
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from aggregator.monitoring import rejection_bucket
from aggregator.state import AggregatorState, DeviceRow, Evaluation, RoundTotals
from fedfmx.errors import ConfigError

REFRESH_S = 15
LAST_REJECTIONS = 15


@dataclass(frozen=True)
class FleetView:
    """What the page shows, read from the state in one go."""

    fleet: str
    num_rounds: int
    devices: list[DeviceRow]
    rounds: list[RoundTotals]
    evaluations: list[Evaluation]
    rejections: list[tuple[int | None, str | None, str]]

    @classmethod
    def read(cls, state: AggregatorState, fleet: str, num_rounds: int) -> FleetView:
        return cls(
            fleet,
            num_rounds,
            state.devices(),
            state.round_totals(),
            state.evaluations(),
            state.rejections(),
        )

    def to_json(self) -> dict[str, object]:
        return {
            "fleet": self.fleet,
            "num_rounds": self.num_rounds,
            "devices": [
                {
                    "device_id": d.device_id,
                    "profile": d.profile,
                    "last_seen": d.last_seen,
                    "updates_accepted": d.updates_accepted,
                    "status": d.status.model_dump(mode="json"),
                }
                for d in self.devices
            ],
            "rounds": [asdict(r) for r in self.rounds],
            "evaluations": [asdict(e) for e in self.evaluations],
            "rejections_by_reason": dict(Counter(rejection_bucket(r) for *_, r in self.rejections)),
        }


def _e(value: object) -> str:
    return html.escape(str(value))


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def _number(value: float | None, unit: str, digits: int = 0) -> str:
    return "–" if value is None else f"{value:.{digits}f} {unit}"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], empty: str) -> str:
    if not rows:
        return f"<p class=empty>{_e(empty)}</p>"
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def line_chart(
    points: Sequence[tuple[float, float]], x_label: str, y_label: str, y_max: float | None
) -> str:
    """An inline SVG polyline of (x, y) points with its axes' end values labelled."""
    if not points:
        return ""
    width, height, pad = 520, 200, 40
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    top = y_max if y_max is not None else (max(ys) * 1.1 or 1.0)

    def at(x: float, y: float) -> str:
        sx = pad + (x - x0) / (x1 - x0) * (width - 2 * pad)
        sy = height - pad - (y / top) * (height - 2 * pad)
        return f"{sx:.1f},{sy:.1f}"

    line = " ".join(at(x, y) for x, y in points)
    dots = "".join(
        f'<circle cx="{at(x, y).split(",")[0]}" cy="{at(x, y).split(",")[1]}" r="3"/>'
        for x, y in points
    )
    return (
        f'<svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img">'
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" '
        "class=axis />"
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" class=axis />'
        f'<polyline points="{line}" class=series />{dots}'
        f'<text x="{pad}" y="{height - 10}">{_e(x_label)} {x0:g}</text>'
        f'<text x="{width - pad}" y="{height - 10}" text-anchor="end">{x1:g}</text>'
        f'<text x="4" y="{pad - 8}">{_e(y_label)} (max {top:.3g})</text>'
        "</svg>"
    )


def render_page(view: FleetView, now: float) -> str:
    """The whole page as one HTML document."""
    online = sum(d.status.state != "offline" for d in view.devices)
    devices = [
        [
            _e(d.device_id),
            f"<span class='state {_e(d.status.state)}'>{_e(d.status.state)}</span>",
            _ago(now - d.last_seen),
            _e(d.profile),
            str(d.updates_accepted),
            _number(d.status.rss_mb, "MB"),
            _number(d.status.peak_rss_mb, "MB"),
            _number(d.status.disk_free_mb, "MB"),
            "–" if d.status.last_round_unix is None else _ago(now - d.status.last_round_unix),
            _e(d.status.source_state or "–"),
            _e("–" if d.status.model_version is None else d.status.model_version),
        ]
        for d in view.devices
    ]
    rounds = [
        [
            str(r.round + 1),
            str(r.task + 1),
            f"{r.updates} / {r.participants}",
            str(r.skips),
            f"{r.uplink_bytes / 1e3:.1f} kB",
            f"{r.mean_loss:.3f}",
            "open" if r.closed is None else f"{r.closed - r.opened:.1f} s",
        ]
        for r in reversed(view.rounds)
    ]
    buckets = Counter(rejection_bucket(reason) for *_, reason in view.rejections)
    rejections = [
        [_e("–" if r is None else r + 1), _e(d or "–"), _e(rejection_bucket(why)), _e(why)]
        for r, d, why in view.rejections[-LAST_REJECTIONS:][::-1]
    ]
    accuracy = line_chart(
        [(e.task + 1, 100 * e.seen) for e in view.evaluations], "task", "accuracy %", 100.0
    )
    loss = line_chart(
        [(r.round + 1, r.mean_loss) for r in view.rounds if r.updates],
        "round",
        "mean train loss",
        None,
    )
    latest = view.rounds[-1] if view.rounds else None
    headline = (
        "no round opened yet"
        if latest is None
        else f"round {latest.round + 1} of {view.num_rounds}, task {latest.task + 1}, "
        + ("open" if latest.closed is None else "closed")
    )
    evaluations = (
        accuracy
        + "<p>"
        + ", ".join(
            f"after task {e.task + 1}: <b>{100 * e.seen:.1f}%</b> (v{e.model_version})"
            for e in view.evaluations
        )
        + "</p>"
        if view.evaluations
        else "<p class=empty>no evaluation stored (run serve with --evaluate)</p>"
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{REFRESH_S}">
<title>fleet {_e(view.fleet)} · fedfmx-edge</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }}
h1 {{ font-size: 1.4em; margin-bottom: 0.2em; }} h2 {{ font-size: 1.1em; margin-top: 1.4em; }}
table {{ border-collapse: collapse; }} td, th {{ padding: 3px 9px; border-bottom: 1px solid #ddd;
  text-align: left; }} th {{ background: #f3f3f3; }}
.state {{ padding: 1px 6px; border-radius: 3px; background: #e8e8e8; }}
.offline {{ background: #f6c9c9; }} .training {{ background: #fbe7a8; }}
.sent, .online, .waiting, .skipped {{ background: #cdebd0; }}
.empty {{ color: #777; }} .axis {{ stroke: #999; }}
.series {{ fill: none; stroke: #2a6fb0; stroke-width: 2; }} circle {{ fill: #2a6fb0; }}
svg text {{ font-size: 11px; fill: #555; }} .grid {{ display: flex; gap: 2em; flex-wrap: wrap; }}
</style></head><body>
<h1>fleet {_e(view.fleet)}</h1>
<p>{_e(headline)} · {online} of {len(view.devices)} devices online ·
{len(view.rejections)} messages rejected · read-only, refreshed every {REFRESH_S} s</p>
<h2>Devices</h2>
{
        _table(
            [
                "device",
                "state",
                "last seen",
                "profile",
                "updates",
                "RSS",
                "peak RSS (round)",
                "disk free",
                "last round",
                "source",
                "model",
            ],
            devices,
            "no device has said hello",
        )
    }
<div class=grid><div><h2>Accuracy over time (every class seen)</h2>{evaluations}</div>
<div><h2>Training loss per round</h2>{loss or "<p class=empty>no updates yet</p>"}</div></div>
<h2>Rounds</h2>
{
        _table(
            ["round", "task", "updates", "skips", "uplink", "mean loss", "duration"],
            rounds,
            "no round yet",
        )
    }
<h2>Rejections</h2>
<p>{", ".join(f"{_e(b)}: {n}" for b, n in buckets.most_common()) or "none"}</p>
{_table(["round", "device", "reason", "detail"], rejections, "nothing rejected")}
</body></html>
"""


class _StatusHandler(BaseHTTPRequestHandler):
    """GET / (HTML) and /status.json; anything else is 404, any other method 405."""

    state: AggregatorState
    fleet: str
    num_rounds: int

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path not in ("/", "/status.json"):
            self._send(404, "text/plain", b"not found\n")
            return
        view = FleetView.read(self.state, self.fleet, self.num_rounds)
        if path == "/status.json":
            self._send(200, "application/json", json.dumps(view.to_json()).encode())
        else:
            self._send(200, "text/html; charset=utf-8", render_page(view, time.time()).encode())

    def do_POST(self) -> None:
        self._send(405, "text/plain", b"read-only\n")

    do_PUT = do_DELETE = do_PATCH = do_POST

    def _send(self, code: int, kind: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: a page refreshed every 15 s would flood the service's log."""


@contextmanager
def serve_status_page(
    state: AggregatorState, fleet: str, num_rounds: int, port: int, host: str
) -> Iterator[ThreadingHTTPServer]:
    """Serve the page on http://host:port/ in a daemon thread while the block runs."""
    handler = type(
        "StatusHandler",
        (_StatusHandler,),
        {"state": state, "fleet": fleet, "num_rounds": num_rounds},
    )
    try:
        server = ThreadingHTTPServer((host, port), handler)
    except OSError as error:
        message = f"status page: cannot listen on {host}:{port}: {error.strerror}"
        raise ConfigError(message) from None
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="status-page", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
