# quishguard as an SMTP filter hop. Build from the repository root:
#   docker build -t quishguard .
# docker-compose.yml runs it behind Postfix; docs/compose.md describes the stack.
FROM python:3.11-slim-bookworm

# libzbar0 is the native library behind pyzbar, one of the two QR decoders;
# the other wheels (zxing-cpp, OpenCV, PyMuPDF) ship their native code.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libzbar0 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/quishguard
COPY pyproject.toml README.md LICENSE ./
COPY src ./src
RUN pip install --no-cache-dir . \
    && useradd --system --home-dir /var/lib/quishguard --shell /usr/sbin/nologin quishguard \
    && mkdir -p /var/lib/quishguard /etc/quishguard \
    && chown quishguard:quishguard /var/lib/quishguard \
    && chmod 0700 /var/lib/quishguard

USER quishguard
VOLUME ["/var/lib/quishguard"]
# 10025: SMTP filter; 8080: quarantine page; 9090: Prometheus metrics.
EXPOSE 10025 8080 9090
ENTRYPOINT ["quishguard"]
CMD ["serve", "--config", "/etc/quishguard/quishguard.toml"]
