"""The web page at ``/``: live transcription from the microphone and the pipeline panel.

Plain HTML, CSS and JavaScript modules from ``app/static``, served as they are: no build step, no CDN
(the page must work on machines without internet access).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from app.errors import APIError

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"
# Set here rather than guessed from the platform's MIME table, which maps .js to text/plain on some
# systems: browsers refuse to run a module script, or an AudioWorklet, served as anything but JavaScript.
MEDIA_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}
# Only these files are served, looked up by name: no request path can reach outside the folder.
FILES = {path.name: path for path in STATIC_DIR.iterdir() if path.suffix in MEDIA_TYPES}
# Revalidate on every load (the ETag makes it cheap), so an upgraded server never runs old scripts.
NO_CACHE = {"Cache-Control": "no-cache"}

router = APIRouter(include_in_schema=False)


def _file(path: Path) -> FileResponse:
    return FileResponse(path, media_type=f"{MEDIA_TYPES[path.suffix]}; charset=utf-8", headers=NO_CACHE)


@router.get("/")
async def index() -> FileResponse:
    return _file(FILES["index.html"])


@router.get("/static/{name}")
async def static_file(name: str) -> FileResponse:
    if (path := FILES.get(name)) is None:
        raise APIError(404, "not_found", f"the page has no file {name!r}")
    return _file(path)
