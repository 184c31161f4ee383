"""Installable package `cmmas` (src layout) with the `cmmas` console script."""

from setuptools import find_packages, setup

setup(
    name="cmmas",
    version="0.1.0",
    description="Cross-modality multi-atlas segmentation with BiRegNet registration and SimNet fusion",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10,<3.13",
    package_dir={"": "src"},
    packages=find_packages("src"),
    install_requires=[
        "numpy>=1.26,<2.4",
        "scipy>=1.11",
        "SimpleITK>=2.4,<3",
        "antspyx>=0.5.4,<0.7",
        "scikit-image>=0.22",
        "matplotlib>=3.8",
        "absl-py>=2.1",
        "tensorboard>=2.18",
        "tqdm>=4.66",
    ],
    extras_require={
        "cpu": ["tensorflow-cpu>=2.18,<2.22"],
        "gpu": ["tensorflow[and-cuda]>=2.18,<2.22"],
        "dask": ["dask[distributed]>=2024.8"],
    },
    entry_points={"console_scripts": ["cmmas=cmmas.cli:main"]},
)
