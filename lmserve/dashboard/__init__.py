"""A live dashboard for people without Grafana: GET /dashboard (one self-contained HTML page,
uPlot inlined, nothing fetched from the network) polls GET /dashboard/data every second and
keeps the last minutes in the browser. The router serves it for its engines, an engine for
itself; sources.py says what the JSON holds. Vendored: uPlot (MIT, static/uPlot.LICENSE)."""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import FastAPI
from starlette.responses import HTMLResponse, JSONResponse, Response

from lmserve.dashboard.sources import Source


@cache
def page() -> str:
    static = resources.files("lmserve.dashboard") / "static"
    html = (static / "index.html").read_text(encoding="utf-8")
    for name in ("uPlot.min.css", "uPlot.iife.min.js"):
        html = html.replace(f"/*{name}*/", (static / name).read_text(encoding="utf-8"), 1)
    return html


def add_dashboard_routes(app: FastAPI, source: Source) -> None:
    @app.get("/dashboard", include_in_schema=False)
    async def dashboard() -> Response:
        return HTMLResponse(page(), headers={"Cache-Control": "no-cache"})

    @app.get("/dashboard/data", include_in_schema=False)
    async def dashboard_data() -> Response:
        return JSONResponse(await source.data(), headers={"Cache-Control": "no-store"})
