"""The paper's model family as variant strings, one helper for every pretraining config.

    KIND-SIZE-PxQ[-dDEPTHxWIDTH][-wW1.W2...]      e.g. mwmae-B-4x16, mae-L-4x16, mwmae-B-8x16-w25

* KIND: ``mwmae`` (multi-window decoder, no class token) or ``mae`` (global decoder heads and a
  class token: the MAE baseline);
* SIZE: the encoder, ``T S M B L H`` (tiny 192 x 12, small 384 x 12, medium 512 x 12, base
  768 x 12, large 1024 x 24, huge 1280 x 32; heads as ``ENCODER_SIZES``);
* PxQ: the patch in STFT frames x mel bins (the paper's 4x16 gives 250 tokens);
* ``-dDEPTHxWIDTH``: the decoder (default 4 x 384, 8 heads), the paper's decoder ablations;
* ``-wW1.W2...``: the decoder's window per head (0: a global head; one value: every head),
  default MW-MAE's (2, 5, 10, 25, 50, 125, 0, 0). Windows must divide the token count: with
  another patch, pass them (``mwmae-B-8x16`` has 125 tokens, which 2, 10 and 50 do not divide).

Everything else is the paper's recipe (:func:`mwmae.train.config.paper_base_config`).
"""

from __future__ import annotations

import dataclasses
import re

import ml_collections

from mwmae.model.config import ENCODER_SIZES, ModelConfig
from mwmae.train.config import paper_base_config

SIZES = {"T": "tiny", "S": "small", "M": "medium", "B": "base", "L": "large", "H": "huge"}
KINDS = ("mwmae", "mae")
DECODER_HEADS = 8
_VARIANT = re.compile(r"^(?P<kind>[a-z]+)-(?P<size>[A-Z])-(?P<p>\d+)x(?P<q>\d+)"
                      r"(?:-d(?P<depth>\d+)x(?P<width>\d+))?(?:-w(?P<windows>[\d.]+))?$")


@dataclasses.dataclass(frozen=True)
class Variant:
    kind: str
    size: str
    patch: tuple[int, int]
    decoder_depth: int = 4
    decoder_width: int = 384
    windows: tuple[int, ...] | None = None   # None: the kind's default

    @property
    def name(self) -> str:
        letter = next(k for k, v in SIZES.items() if v == self.size)
        out = f"{self.kind}-{letter}-{self.patch[0]}x{self.patch[1]}"
        if (self.decoder_depth, self.decoder_width) != (4, 384):
            out += f"-d{self.decoder_depth}x{self.decoder_width}"
        if self.windows is not None:
            out += "-w" + ".".join(map(str, self.windows))
        return out


def parse_variant(variant: str) -> Variant:
    """A variant string (see the module docstring) -> its fields; a ValueError saying the
    grammar otherwise."""
    m = _VARIANT.match(variant)
    if not m or m["kind"] not in KINDS or m["size"] not in SIZES:
        raise ValueError(f"model variant {variant!r}: expected KIND-SIZE-PxQ[-dDEPTHxWIDTH]"
                         f"[-wW1.W2...] with KIND in {KINDS} and SIZE one of "
                         f"{''.join(SIZES)} (e.g. mwmae-B-4x16)")
    windows = tuple(int(w) for w in m["windows"].split(".") if w) if m["windows"] else None
    return Variant(m["kind"], SIZES[m["size"]], (int(m["p"]), int(m["q"])),
                   int(m["depth"] or 4), int(m["width"] or 384), windows)


def pretrain_config(variant: str) -> ml_collections.ConfigDict:
    """The paper's pretraining recipe with the model ``variant`` names; raises ValueError for a
    variant whose model is invalid (the message names the field, e.g. windows that do not
    divide the token count)."""
    v = parse_variant(variant)
    c = paper_base_config(v.kind)
    if v.decoder_width % DECODER_HEADS:
        raise ValueError(f"model variant {variant!r}: decoder width {v.decoder_width} is not a "
                         f"multiple of its {DECODER_HEADS} heads")
    c.model.update(**ENCODER_SIZES[v.size], patch_size=v.patch,
                   decoder_depth=v.decoder_depth, decoder_embed_dim=v.decoder_width,
                   decoder_num_heads=DECODER_HEADS)
    if v.windows is not None:
        windows = v.windows * DECODER_HEADS if len(v.windows) == 1 else v.windows
        c.model.decoder_window_sizes = windows
    try:
        ModelConfig.from_dict(c.model.to_dict())
    except ValueError as e:
        raise ValueError(f"model variant {variant!r}: {e}") from e
    return c


def family(kinds: tuple[str, ...] = KINDS, patch: str = "4x16") -> list[str]:
    """Every encoder size of each kind, with the paper's decoder: the scaling study's models."""
    return [f"{k}-{s}-{patch}" for k in kinds for s in SIZES]


# Decoder ablations of the base model along the paper's axes (depth, width, the window list).
# The exact settings the paper ran are in its appendix and are not typed in here: these are
# starting points, each a valid variant.
DECODER_ABLATIONS = (
    "mwmae-B-4x16-d2x384", "mwmae-B-4x16-d8x384", "mwmae-B-4x16-d4x256",
    "mwmae-B-4x16-d4x512", "mae-B-4x16-d2x384", "mae-B-4x16-d8x384",
    "mwmae-B-4x16-w2.5.10.25.50.125.250.0", "mwmae-B-4x16-w5.5.25.25.125.125.0.0",
)
