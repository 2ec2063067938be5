from setuptools import find_packages, setup

with open("requirements.txt") as f:
    install_requires = [line.strip() for line in f if line.strip() and not line.startswith("#")]

setup(
    name="wan-forge",
    version="0.1.0",
    description="Wan video diffusion models: reimplementation, pipelines, training and Self-Forcing distillation",
    packages=find_packages(include=["wan", "wan.*", "pipelines", "pipelines.*", "trainers", "trainers.*"]),
    python_requires=">=3.10",
    install_requires=install_requires,
    extras_require={
        "test": ["pytest", "diffusers>=0.33", "accelerate", "sentencepiece", "peft", "playwright"],
        "app": ["gradio>=5"],
        "flash": ["flash-attn"],
    },
)
