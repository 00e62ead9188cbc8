"""Function-preserving depth growth of a reference model (an experiment for issue #22):

    python -m models.training.grow models/reference/transformer runs/grow/transformer-8L

Every layer is followed by a copy of itself whose output is zeroed (the post-norm weights of
Olmo 3's reordered-norm layers; the output projections of pre-norm layers), so the grown
model's logits equal the original's exactly (checked before saving, and again after reloading)
and training starts where the original stands. models/reference/SFT.md has what it measured.
"""

from __future__ import annotations

import argparse
import copy
import shutil
from pathlib import Path


def grow(src: str | Path, out: str | Path) -> float:
    """Write the grown model to ``out``; the largest logit difference to ``src`` on a probe
    text (0.0 for an exact growth), after reloading the saved copy."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = AutoModelForCausalLM.from_pretrained(src)
    tok = AutoTokenizer.from_pretrained(src)
    types = list(m.config.layer_types)
    layers, new_types = torch.nn.ModuleList(), []
    for i, layer in enumerate(m.model.layers):
        twin = copy.deepcopy(layer)
        with torch.no_grad():
            params = dict(twin.named_parameters())
            if "post_feedforward_layernorm.weight" in params:  # reordered norm
                params["post_feedforward_layernorm.weight"].zero_()
                params["post_attention_layernorm.weight"].zero_()
            else:  # pre-norm: zero the residual branches' outputs
                for name, p in params.items():
                    if name.endswith(("o_proj.weight", "down_proj.weight")):
                        p.zero_()
        layers.extend([layer, twin])
        new_types += [types[i], types[i]]
    for j, layer in enumerate(layers):
        for mod in layer.modules():
            if hasattr(mod, "layer_idx"):
                setattr(mod, "layer_idx", j)  # noqa: B010 - a plain attribute here
    m.model.layers = layers
    m.config.num_hidden_layers = len(layers)
    m.config.layer_types = new_types
    Path(out).mkdir(parents=True, exist_ok=True)
    m.save_pretrained(out)
    tok.save_pretrained(out)
    for f in ("chat_template.jinja", "generation_config.json"):
        if (Path(src) / f).exists():
            shutil.copy(Path(src) / f, Path(out) / f)
    ids = torch.tensor([tok.encode("def add(a, b):\n    return a + b\n\nprint(add(1, 2))")])
    orig = AutoModelForCausalLM.from_pretrained(src)
    grown = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        return float((orig(ids).logits - grown(ids).logits).abs().max())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.training.grow", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="a reference model folder (models/reference/transformer)")
    p.add_argument("out", help="where the grown model goes")
    a = p.parse_args(argv)
    diff = grow(a.src, a.out)
    print(f"{a.out}: twice the layers; max |logit difference| to {a.src}: {diff:g}")
    return 0 if diff < 1e-5 else 1


if __name__ == "__main__":
    raise SystemExit(main())
