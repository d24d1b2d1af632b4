FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY worker ./worker
COPY tasks ./tasks
COPY config ./config
RUN pip install --no-cache-dir . && useradd --create-home oprecon && mkdir -p /var/lib/oprecon \
    && chown oprecon /var/lib/oprecon
USER oprecon
ENV OPRECON_HEARTBEAT_DIR=/var/lib/oprecon/heartbeat
