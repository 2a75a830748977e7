from setuptools import find_packages, setup

setup(
    name="llama-posttrain",
    version="0.1.0",
    description="Llama 3 style post-training (reward model, rejection sampling + SFT, DPO, averaging) in PyTorch",
    python_requires=">=3.10",
    # one importable name, so that nothing of ours shadows a package users have (transformers needs one called
    # `kernels`): llama_posttrain.{llama,losses,data,kernels,train}
    packages=find_packages(include=["llama_posttrain", "llama_posttrain.*"]),
    package_data={"llama_posttrain.llama": ["assets/*"]},
    install_requires=[
        "torch>=2.6",
        "numpy",
        "sentencepiece",
        "tiktoken",
        "safetensors",
        "einops",
        "wandb",
        "triton; platform_system == 'Linux'",
        "pyyaml",
    ],
    extras_require={
        "plots": ["matplotlib"],  # the pipeline's accuracy.png and rewards.png (llama_posttrain/driver/plots.py)
        "gguf": ["gguf"],  # convert --from gguf (llama_posttrain/llama/formats/gguf.py imports it, nothing else)
        "ray": ["ray"],  # launcher: ray (llama_posttrain/driver/launch_ray.py imports it, nothing else)
        # test-only references (never imported by the packages), and matplotlib so that the plots are tested
        "dev": ["pytest", "ruff", "transformers", "tokenizers", "jinja2", "trl", "matplotlib", "gguf", "ray"],
    },
)
