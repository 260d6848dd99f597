from setuptools import find_packages, setup

setup(
    name="unimm",
    version="0.1.0",
    description="JAX/TPU-native training of unified multimodal understanding + generation models",
    packages=find_packages(include=["unimm", "unimm.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "grain>=0.2.18",
        "tensorflow-datasets>=4.9.10",
        "ml-collections>=1.1.0",
        "transformers>=5.0",
        "numpy",
        "scipy",
        "pillow",
        "tensorboardX",
        "tqdm",
        "safetensors",
        "msgpack",
        "pyarrow",
        "array-record",
        "psutil",
        # PSNR / SSIM of `python -m unimm.tokenize reconstruct`, and its bundled test photos
        "scikit-image",
    ],
    extras_require={
        # torch: the PyTorch DataLoader peer of unimm.data.bench and the parity tests against
        # diffusers / transformers / vector-quantize-pytorch; 2.13.0 is the CPU build this machine keeps on disk
        "test": ["pytest>=8", "pytest-xdist>=3.6", "torch==2.13.0", "diffusers>=0.40", "vector-quantize-pytorch>=1.32"],
        # workdirs on gs://: etils.epath (fsspec) and tensorboardX's GCS writer
        "gcs": ["gcsfs", "google-cloud-storage"],
        "gpu": ["jax[cuda13]>=0.10.2", "gcsfs", "google-cloud-storage"],
        "tpu": ["jax[tpu]>=0.10.2", "gcsfs", "google-cloud-storage"],
        # model.moe.impl="tokamax": the Mosaic GPU grouped matmul (needs jax >= 0.11.1)
        "tokamax": ["tokamax", "jax>=0.11.1"],
    },
)
