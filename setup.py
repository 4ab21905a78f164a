from setuptools import find_packages, setup

setup(
    name="decesc",
    version="0.1.0",
    description="A from-scratch PyTorch reference implementation of DecoupledESC "
                "(decoupled strategy planning and response generation for emotional support)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["decesc", "decesc.*", "tools"]),
    package_data={"decesc": ["data/*.jsonl"]},
    install_requires=[
        # torch is pinned by the install instructions (pip install torch==2.13.0 first), so this
        # range never pulls a different build on a machine that already has torch.
        "torch>=2.5",
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "huggingface-hub>=0.23",
        "numpy>=1.24",
        "tqdm>=4.60",
    ],
    extras_require={
        # Reference implementations the tests check parity against; never imported by decesc:
        # transformers/peft (model, LoRA), gguf (dequantisation), scikit-learn (F1), nltk (BLEU,
        # the implementation the field's evaluation scripts use), openai (the client that drives
        # tools.serve in its tests).
        "test": ["pytest>=7", "transformers>=4.45", "peft>=0.12", "gguf>=0.10", "scikit-learn>=1.3",
                 "nltk>=3.8", "openai>=1.0"],
    },
)
