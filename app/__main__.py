"""``python -m app``: serve on ASR_HOST:ASR_PORT with uvicorn (one process, one event loop)."""

import logging

import uvicorn

from app.main import create_app
from configs import Settings


def main() -> None:
    settings = Settings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per webhook delivery would drown the log
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level,
                timeout_graceful_shutdown=30,
                # the stream route answers frames over ASR_STREAM_MAX_FRAME_BYTES itself (error event, close 1009);
                # uvicorn's own limit only stops frames too large to even hold in memory
                ws_max_size=max(16 << 20, 2 * settings.stream_max_frame_bytes))


if __name__ == "__main__":
    main()
