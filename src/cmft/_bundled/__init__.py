"""Files that cmft reads at run time, shipped inside the package.

There is one copy of each, in the repository's top-level folders; the build maps them here
(`pyproject.toml`, `[tool.setuptools] package-dir`):

    recipes/   -> cmft._bundled.recipes    fine-tuning recipes
    pretrain/  -> cmft._bundled.pretrain   pretraining configs and the medical lexicon
    export/    -> cmft._bundled.export     the ONNX export profile
    data/      -> cmft._bundled.data       the redistributable data sets and DATA.md

Read them through `cmft.paths`, never by a path relative to the working directory.
"""
