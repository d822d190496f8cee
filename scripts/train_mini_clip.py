"""Train fewclip-mini: a small CLIP (open_clip architecture) on image-text pairs that install offline.

The data comes from Debian packages whose licences allow redistributing weights trained on them:

* ``openclipart``: Openclipart 0.18 (``openclipart-png``, public domain). Captions come from each drawing's
  title, keywords and folder, read from the SVG twin's metadata when ``openclipart-svg`` is installed, else
  from the file and folder names.
* ``emoji``: Noto Color Emoji (``fonts-noto-color-emoji``; font OFL 1.1, artwork Apache 2.0), every
  fully-qualified emoji of ``/usr/share/unicode/emoji/emoji-test.txt`` (``unicode-data``) without skin-tone
  variants, rendered with PIL and captioned with its CLDR short name, plus CLDR keywords
  (``unicode-cldr-core``, Unicode licence) and its emoji subgroup.
* ``glyphs``: characters rendered from the DejaVu fonts (``fonts-dejavu-core`` / ``-extra``, Bitstream Vera
  licence: free to use and redistribute) and captioned with their Unicode names (``unicodedata``): the
  62 ASCII letters and digits in every installed DejaVu face, about 1,500 other letters, numerals and symbols
  (Latin-1, Greek, Cyrillic, currency, letterlike, number forms, arrows, maths, circled numbers, shapes,
  miscellaneous symbols, dingbats) in one face each.
* ``csv:PATH``: your own pairs, a CSV with columns ``path,caption`` (paths relative to the CSV).

Tux Paint stamps are reserved for independent evaluation and refused as a data source.

The images are rendered once into an array cache (``--cache-dir``, not part of the repository): RGBA at the
model's input size, the drawing padded to a square on a transparent background. Each step composites them onto
a random background (white, black or a random colour; glyphs get a random contrasting ink), applies CLIP's
random resized crop (scale 0.9-1, ratio 3/4-4/3), and, with small probabilities, grey scale and a
low-resolution round trip; each item's caption is drawn from its variants. Loss: CLIP's symmetric
cross-entropy with a learned temperature. After every epoch the script logs the loss, the temperature and
image -> text retrieval accuracy on a held-out 5% of the data (a seeded split), and writes a resumable
checkpoint (safetensors + JSON; no pickles). The weights are written as fp16 safetensors in open_clip's
state-dict layout, loadable by ``open_clip.create_model(name, pretrained=FILE)`` and by
``fewclip run backbone=open_clip backbone.model=NAME backbone.pretrained=FILE``.

    python scripts/train_mini_clip.py                 # the shipped model (30 epochs; resumes an interrupted run)
    python scripts/train_mini_clip.py --epochs 2 --out /tmp/mini.safetensors   # a short trial
    python scripts/train_mini_clip.py --sources openclipart,emoji,glyphs,csv:my_pairs.csv --epochs 40 \\
        --model-config my_bigger.json --out my_model.safetensors
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import math
import os
import re
import sys
import time
import unicodedata
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

log = logging.getLogger("train_mini_clip")

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "caches" / "model_configs"
DATA_VERSION = 1  # bump when rendering or captioning changes: it names the array cache

OPENCLIPART_ROOT = Path("/usr/share/openclipart")
EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
EMOJI_TEST = Path("/usr/share/unicode/emoji/emoji-test.txt")
CLDR_ANNOTATIONS = Path("/usr/share/unicode/cldr/common/annotations/en.xml")
DEJAVU_DIR = Path("/usr/share/fonts/truetype/dejavu")
RESERVED = ("tuxpaint", "tux-paint", "tux_paint")  # independent evaluation data: never trained on

LICENSES = {
    "openclipart": "public domain (Openclipart 0.18, Debian openclipart-png / openclipart-svg)",
    "emoji": "Noto Color Emoji artwork Apache-2.0, font OFL-1.1 (Debian fonts-noto-color-emoji); names: "
             "Unicode emoji-test.txt and CLDR annotations, Unicode licence (unicode-data, unicode-cldr-core)",
    "glyphs": "DejaVu fonts, Bitstream Vera / public-domain changes (Debian fonts-dejavu-*); names: Unicode "
              "character database (Python unicodedata)",
    "csv": "as supplied by the user",
}
# Unicode blocks of the glyph source (inclusive ranges).
GLYPH_BLOCKS = [(0x20, 0x7E), (0xC0, 0xFF), (0x370, 0x3FF), (0x400, 0x4FF), (0x20A0, 0x20CF), (0x2100, 0x218F),
                (0x2190, 0x21FF), (0x2200, 0x22FF), (0x2460, 0x24FF), (0x25A0, 0x25FF), (0x2600, 0x26FF),
                (0x2700, 0x27BF)]
DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# Openclipart keywords that describe the collection or the file, not the picture.
META_KEYWORDS = {"hash", "icons", "icon", "theme", "computer", "magick", "lemon_theme_icon", "unsorted", "special",
                 "appicon", "signs_and_symbols", "mapsym", "clip art", "clipart", "media", "svg", "png",
                 "openclipart", "externalsource", "nicubunu", "white", "webpage", "menu", "mimetypes",
                 "mime-types", "filesystem", "application", "action", "united_nations_member"}


# ----------------------------------------------------------------------------------------------------------------
# Items and captions
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class Item:
    """One image with its caption variants (``captions[0]`` is the canonical one, used for held-out retrieval)."""

    key: str
    source: str
    captions: list[str]
    recolor: bool = False  # an ink mask (glyphs): composited with a random ink colour at training time
    render: dict = field(default_factory=dict)  # how to render it (kind + arguments)


def _clean_words(text: str) -> str:
    text = re.sub(r"[_\-]+", " ", text)
    text = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", text)  # camelCase
    text = re.sub(r"\s+", " ", text).strip()
    return text


def _strip_numbers(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"\d+", " ", text)).strip()


def _svg_metadata(svg: Path) -> dict:
    """Title, description, keywords and creator of an Openclipart SVG (its ``cc:Work`` block)."""
    try:
        root = ET.parse(svg).getroot()
    except (ET.ParseError, OSError):
        return {}
    for el in root.iter():
        if not el.tag.endswith("}Work"):
            continue
        out: dict = {"keywords": []}
        for child in el:
            tag = child.tag.rsplit("}", 1)[-1]
            if tag == "title" and child.text:
                out["title"] = child.text.strip()
            elif tag == "description" and child.text:
                out["description"] = child.text.strip()
            elif tag == "subject":
                out["keywords"] = [li.text.strip() for li in child.iter() if li.tag.endswith("}li") and li.text]
            elif tag == "creator":
                names = [t.text.strip() for t in child.iter() if t.tag.endswith("}title") and t.text]
                if names:
                    out["creator"] = names[0]
        return out
    return {}


def _openclipart_name(stem: str, meta: dict, title_counts: Counter) -> str:
    """What the drawing shows, in words: its own title, else the file name without the author's name."""
    title = meta.get("title") or ""
    if " - " in title and title.lower().startswith("clipart by"):
        title = title.split(" - ", 1)[1]  # "Clipart by Nicu Buculei - smiley111"
    shared = title_counts[meta.get("title") or ""] > 5  # a collection's name ("Lemon SVG theme"), not the picture's
    bad = not title or shared or title.lower().startswith(("part of", "svg ", "various"))
    name = _strip_numbers(_clean_words(title)) if not bad else ""
    if not name:
        words = _strip_numbers(_clean_words(stem)).lower().split()
        creator = [w.lower() for w in re.split(r"\W+", meta.get("creator", "")) if len(w) > 1]
        # File names end with the (often truncated) author name: drop words that start an author word.
        keep = [w for w in words if not any(c.startswith(w) for c in creator)]
        name = " ".join(keep or words)
    return name.lower()


def openclipart_items(root: Path, max_per_folder: int, seed: int) -> list[Item]:
    """Every PNG under ``root/png`` (capped per folder), captioned from the SVG metadata when present."""
    png_root, svg_root = root / "png", root / "svg"
    if not png_root.is_dir():
        raise SystemExit(f"openclipart: {png_root} is missing (apt-get install openclipart-png)")
    pngs = sorted(png_root.rglob("*.png"))
    rng = np.random.default_rng(seed)
    by_folder: dict[Path, list[Path]] = {}
    for p in pngs:
        by_folder.setdefault(p.parent, []).append(p)
    chosen: list[Path] = []
    for folder in sorted(by_folder):
        files = by_folder[folder]
        if len(files) > max_per_folder:  # e.g. 1,378 generated stars: keep a seeded sample
            idx = np.sort(rng.choice(len(files), max_per_folder, replace=False))
            files = [files[i] for i in idx]
        chosen += files
    metas = {}
    for p in chosen:
        svg = svg_root / p.relative_to(png_root).with_suffix(".svg")
        metas[p] = _svg_metadata(svg) if svg.is_file() else {}
    if not svg_root.is_dir():
        log.warning("openclipart: %s missing (apt-get install openclipart-svg); captions from file names only",
                    svg_root)
    title_counts = Counter(m.get("title") or "" for m in metas.values())
    items = []
    for p in chosen:
        meta = metas[p]
        rel = p.relative_to(png_root)
        name = _openclipart_name(p.stem, meta, title_counts)
        folders = [_clean_words(f).lower() for f in rel.parts[:-1]]
        where = folders[-1] if folders else "clip art"
        creator = _clean_words(meta.get("creator", "")).lower()
        kws = []
        for raw in meta.get("keywords", []):
            k = _clean_words(raw).lower()
            if (k and raw.lower() not in META_KEYWORDS and k not in META_KEYWORDS and k not in kws and k != name
                    and k != creator and not k.isdigit()):
                kws.append(k)
        tags = ", ".join(kws[:3])
        captions = [f"a clip art of {name}", name, f"a drawing of {name}, {where}", f"an illustration of {name}",
                    f"{where}: {name}", f"a picture of {name}"]
        if tags:
            captions += [f"a clip art of {name}, {tags}", f"{name}, {tags}"]
        items.append(Item(key=f"openclipart/{rel}", source="openclipart", captions=captions,
                          render={"kind": "png", "path": str(p)}))
    return items


def _cldr_keywords(path: Path) -> dict[str, list[str]]:
    if not path.is_file():
        log.warning("emoji: %s missing (apt-get install unicode-cldr-core); no keyword captions", path)
        return {}
    out = {}
    for el in ET.parse(path).getroot().iter("annotation"):
        if el.get("type") is None and el.text:
            out[el.get("cp")] = [k.strip() for k in el.text.split("|") if k.strip()]
    return out


def emoji_items(font: Path, test_file: Path, cldr: Path) -> list[Item]:
    """Fully-qualified emoji of ``emoji-test.txt`` without skin-tone variants."""
    if not font.is_file():
        raise SystemExit(f"emoji: {font} is missing (apt-get install fonts-noto-color-emoji)")
    if not test_file.is_file():
        raise SystemExit(f"emoji: {test_file} is missing (apt-get install unicode-data)")
    keywords = _cldr_keywords(cldr)
    items = []
    subgroup = ""
    for line in test_file.read_text(encoding="utf-8").splitlines():
        if line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip().replace("-", " ")
            continue
        if "; fully-qualified" not in line:
            continue
        codes, comment = line.split(";", 1)[0].split(), line.split("#", 1)[1].strip()
        # comment: "<emoji> E<version> <name>"
        name = comment.split(" ", 2)[2].strip().lower()
        if "skin tone" in name:
            continue
        text = "".join(chr(int(c, 16)) for c in codes)
        kws = [k for k in keywords.get(text.replace("\ufe0f", ""), []) if k.lower() != name][:3]
        captions = [f"an emoji of {name}", name, f"an icon of {name}", f"{subgroup}: {name}",
                    f"a picture of {name}"]
        if kws:
            captions += [f"{name}, {', '.join(kws)}", f"an emoji of {name}, {', '.join(kws)}"]
        items.append(Item(key="emoji/" + "-".join(codes), source="emoji", captions=captions,
                          render={"kind": "emoji", "text": text}))
    return items


def _font_style(path: Path) -> str:
    """``DejaVuSansMono-BoldOblique.ttf`` -> ``sans mono bold oblique``."""
    stem = path.stem.replace("DejaVu", "")
    return _clean_words(stem.replace("-", " ")).lower()


def glyph_items(font_dir: Path, seed: int) -> list[Item]:
    """ASCII letters and digits in every DejaVu face; other characters of ``GLYPH_BLOCKS`` in one face each."""
    from fontTools.ttLib import TTFont

    fonts = sorted(font_dir.glob("*.ttf"))
    if not fonts:
        raise SystemExit(f"glyphs: no fonts in {font_dir} (apt-get install fonts-dejavu-core fonts-dejavu-extra)")
    cmaps = {f: set(TTFont(f).getBestCmap()) for f in fonts}
    rng = np.random.default_rng(seed)
    items = []
    for a, b in GLYPH_BLOCKS:
        for code in range(a, b + 1):
            ch = chr(code)
            if unicodedata.category(ch)[0] not in "LNSP":
                continue
            try:
                uname = unicodedata.name(ch).lower()
            except ValueError:
                continue
            have = [f for f in fonts if code in cmaps[f]]
            if not have:
                continue
            alnum = ch.isascii() and ch.isalnum()
            faces = have if alnum else [have[int(rng.integers(len(have)))]]
            for face in faces:
                style = _font_style(face)
                captions = [f"the character {uname}", uname, f"{uname} in {style} type", f'the symbol "{ch}"',
                            f"a picture of {uname}"]
                if ch.isdigit() and ch.isascii():
                    word = DIGIT_WORDS[int(ch)]
                    captions += [f"the number {word}", f'the number "{ch}"', f"the digit {word}", word]
                elif alnum:
                    case = "capital" if ch.isupper() else "small"
                    captions += [f'the letter "{ch}"', f"the {case} letter {ch.lower()}"]
                items.append(Item(key=f"glyphs/{code:04X}/{face.stem}", source="glyphs", captions=captions,
                                  recolor=True, render={"kind": "glyph", "text": ch, "font": str(face)}))
    return items


def csv_items(path: Path) -> list[Item]:
    """``path,caption`` rows; paths relative to the CSV. Several rows may share an image (caption variants)."""
    if not path.is_file():
        raise SystemExit(f"csv source: {path} does not exist")
    by_image: dict[str, list[str]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"path", "caption"} <= set(reader.fieldnames):
            raise SystemExit(f"csv source {path}: needs columns path,caption; found {reader.fieldnames}")
        for row in reader:
            img = (path.parent / row["path"]).resolve()
            by_image.setdefault(str(img), []).append(row["caption"].strip())
    return [Item(key=f"csv/{p}", source="csv", captions=c, render={"kind": "png", "path": p})
            for p, c in by_image.items()]


def collect_items(sources: Sequence[str], seed: int, max_per_folder: int) -> list[Item]:
    items: list[Item] = []
    for src in sources:
        if any(r in src.lower() for r in RESERVED):
            raise SystemExit(f"source {src}: Tux Paint stamps are reserved for independent evaluation")
        if src == "openclipart":
            items += openclipart_items(OPENCLIPART_ROOT, max_per_folder, seed)
        elif src == "emoji":
            items += emoji_items(EMOJI_FONT, EMOJI_TEST, CLDR_ANNOTATIONS)
        elif src == "glyphs":
            items += glyph_items(DEJAVU_DIR, seed)
        elif src.startswith("csv:"):
            items += csv_items(Path(src[4:]))
        else:
            raise SystemExit(f"unknown source {src!r}: use openclipart, emoji, glyphs or csv:PATH")
    for it in items:
        if any(r in json.dumps(it.render).lower() for r in RESERVED):
            raise SystemExit(f"{it.key}: Tux Paint stamps are reserved for independent evaluation")
    return items


# ----------------------------------------------------------------------------------------------------------------
# Rendering into the array cache
# ----------------------------------------------------------------------------------------------------------------

def _square_rgba(img: Image.Image, size: int, margin: float) -> np.ndarray:
    """Crop to the visible content, pad to a square with ``margin`` (fraction of the side), resize: ``[S, S, 4]``."""
    img = img.convert("RGBA")
    bbox = img.getchannel("A").getbbox()
    if bbox:
        img = img.crop(bbox)
    w, h = img.size
    side = max(1, int(round(max(w, h) * (1 + 2 * margin))))
    canvas = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    # Premultiplied alpha while resampling, so transparent pixels' colours do not bleed into the edges.
    out = canvas.convert("RGBa").resize((size, size), Image.Resampling.LANCZOS, reducing_gap=3.0).convert("RGBA")
    return np.asarray(out, dtype=np.uint8)


_EMOJI_FONT_CACHE: dict[str, ImageFont.FreeTypeFont] = {}


def render_item(render: dict, size: int, margin: float) -> np.ndarray | None:
    """``[S, S, 4]`` uint8 RGBA, or None when the item cannot be rendered (unreadable file, missing glyph)."""
    kind = render["kind"]
    if kind == "png":
        # A few Openclipart PNGs are 170 Mpx posters (system files, not hostile): allow them, within a bound.
        Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, 250_000_000)
        try:
            with Image.open(render["path"]) as im:
                im.draft("RGB", (size * 4, size * 4))  # JPEG only: decode at a reduced scale
                if max(im.size) > 8 * size:
                    im.thumbnail((8 * size, 8 * size), Image.Resampling.BILINEAR)
                return _square_rgba(im, size, margin)
        except (OSError, ValueError, Image.DecompressionBombError):
            return None
    if kind == "emoji":
        # CBDT bitmap font: one strike at 109 px; RAQM layout joins ZWJ sequences, flags and keycaps.
        font = _EMOJI_FONT_CACHE.get("emoji")
        if font is None:
            font = _EMOJI_FONT_CACHE["emoji"] = ImageFont.truetype(str(EMOJI_FONT), 109,
                                                                   layout_engine=ImageFont.Layout.RAQM)
        # A sequence the font cannot join falls back to several glyphs side by side: not one picture.
        if font.getlength(render["text"]) > 1.5 * font.getlength("\U0001F600"):
            return None
        canvas = Image.new("RGBA", (400, 160), (0, 0, 0, 0))
        ImageDraw.Draw(canvas).text((10, 10), render["text"], font=font, embedded_color=True)
        if canvas.getchannel("A").getbbox() is None:
            return None
        return _square_rgba(canvas, size, margin)
    if kind == "glyph":
        font = ImageFont.truetype(render["font"], 96)
        canvas = Image.new("L", (260, 200), 0)
        ImageDraw.Draw(canvas).text((40, 30), render["text"], font=font, fill=255)
        if canvas.getbbox() is None:
            return None
        rgba = Image.merge("RGBA", (canvas, canvas, canvas, canvas))  # white ink; alpha = coverage
        return _square_rgba(rgba, size, margin)
    raise ValueError(f"unknown render kind {kind}")


def _render_worker(args: tuple[dict, int, float]) -> np.ndarray | None:
    return render_item(*args)


def item_margin(key: str, seed: int) -> float:
    """A fixed per-item border (5-25% of the side), so drawings do not all fill the frame the same way."""
    digest = hashlib.sha256(f"{seed}|{key}".encode()).digest()
    return 0.05 + 0.20 * int.from_bytes(digest[:4], "little") / 2**32


def build_cache(items: list[Item], size: int, cache_dir: Path, seed: int, workers: int
                ) -> tuple[np.ndarray, list[Item]]:
    """Render every item once (``[N, S, S, 4]`` uint8); reused while the item list and size are unchanged."""
    spec = {"version": DATA_VERSION, "size": size, "seed": seed, "items": [[it.key, it.render] for it in items]}
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    folder = cache_dir / f"mini-clip-data-{size}px-{digest}"
    if (folder / "items.json").is_file():
        kept = json.loads((folder / "items.json").read_text())
        images = np.load(folder / "images.npy", mmap_mode="r")
        if len(kept) == images.shape[0]:
            log.info("array cache %s: %d images", folder, len(kept))
            return np.ascontiguousarray(images), [Item(**d) for d in kept]
    t = time.perf_counter()
    jobs = [(it.render, size, item_margin(it.key, seed)) for it in items]
    if workers > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(workers) as pool:
            rendered = pool.map(_render_worker, jobs, chunksize=32)
    else:
        rendered = [_render_worker(j) for j in jobs]
    keep = [i for i, r in enumerate(rendered) if r is not None]
    skipped = [items[i].key for i, r in enumerate(rendered) if r is None]
    if skipped:
        log.warning("%d items could not be rendered and are left out, e.g. %s", len(skipped), skipped[:5])
    images = np.stack([rendered[i] for i in keep])
    kept_items = [items[i] for i in keep]
    tmp = cache_dir / f".tmp-{folder.name}-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    np.save(tmp / "images.npy", images)
    (tmp / "items.json").write_text(json.dumps([asdict(it) for it in kept_items]))
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    tmp.rename(folder)
    log.info("rendered %d images into %s in %.0f s", len(kept_items), folder, time.perf_counter() - t)
    return images, kept_items


# ----------------------------------------------------------------------------------------------------------------
# Augmentation (batched, seeded)
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AugmentConfig:
    scale: tuple[float, float] = (0.9, 1.0)  # random resized crop, CLIP / open_clip training default
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    bg_white: float = 0.4  # background: white, black, else a random colour
    bg_black: float = 0.2
    grey_p: float = 0.2  # grey scale
    lowres_p: float = 0.2  # down to a random 8-32 px and back up
    lowres_min: int = 8
    lowres_max: int = 32


def _luma(rgb: torch.Tensor) -> torch.Tensor:
    return 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]


def augment(rgba: torch.Tensor, recolor: torch.Tensor, out_size: int, aug: AugmentConfig, gen: torch.Generator,
            mean: torch.Tensor, std: torch.Tensor, train: bool = True) -> torch.Tensor:
    """Composite, crop and normalise a batch.

    Args:
        rgba: ``[B, S, S, 4]`` uint8.
        recolor: ``[B]`` bool, True for ink masks (glyphs).
        train: False gives the evaluation view: white background, black ink, no crop.
    Returns:
        ``[B, 3, out, out]`` float32, normalised with ``mean`` / ``std``.
    """
    b = rgba.shape[0]
    x = rgba.permute(0, 3, 1, 2).float() / 255.0
    rgb, alpha = x[:, :3], x[:, 3:4]
    if train:
        u = torch.rand(b, generator=gen)
        bg = torch.rand(b, 3, generator=gen)
        bg[u < aug.bg_white + aug.bg_black] = 0.0
        bg[u < aug.bg_white] = 1.0
        ink = torch.rand(b, 3, generator=gen)
        weak = (_luma(ink[:, :, None, None]) - _luma(bg[:, :, None, None])).abs().view(b) < 0.4
        ink[weak] = 1.0 - bg[weak]  # too little contrast with the background: the opposite colour
    else:
        bg = torch.ones(b, 3)
        ink = torch.zeros(b, 3)
    rgb = torch.where(recolor.view(b, 1, 1, 1), ink[:, :, None, None].expand_as(rgb), rgb)
    if train:
        # A dark drawing on a black background (or a light one on white) would vanish: use the opposite plain one.
        content = (_luma(rgb) * alpha[:, 0]).sum(dim=(1, 2)) / alpha[:, 0].sum(dim=(1, 2)).clamp(min=1e-6)
        clash = (content - _luma(bg[:, :, None, None]).view(b)).abs() < 0.2
        bg[clash] = (content[clash] < 0.5).float()[:, None].expand(-1, 3)
    img = rgb * alpha + bg[:, :, None, None] * (1 - alpha)
    if train:
        # Random resized crop as an affine sampling grid: area fraction s, aspect r, uniform position.
        s = aug.scale[0] + (aug.scale[1] - aug.scale[0]) * torch.rand(b, generator=gen)
        lo, hi = math.log(aug.ratio[0]), math.log(aug.ratio[1])
        r = torch.exp(lo + (hi - lo) * torch.rand(b, generator=gen))
        w = torch.sqrt(s * r).clamp(max=1.0)
        h = torch.sqrt(s / r).clamp(max=1.0)
        tx = (1 - w) * (2 * torch.rand(b, generator=gen) - 1)
        ty = (1 - h) * (2 * torch.rand(b, generator=gen) - 1)
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w, tx, h, ty
        grid = F.affine_grid(theta, [b, 3, out_size, out_size], align_corners=False)
        img = F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=False)
        grey = torch.rand(b, generator=gen) < aug.grey_p
        if grey.any():
            img[grey] = _luma(img[grey])[:, None].expand(-1, 3, -1, -1)
        low = torch.rand(b, generator=gen) < aug.lowres_p
        if low.any():
            k = int(torch.randint(aug.lowres_min, aug.lowres_max + 1, (1,), generator=gen))
            small = F.interpolate(img[low], size=(k, k), mode="area")
            img[low] = F.interpolate(small, size=(out_size, out_size), mode="bicubic", align_corners=False)
    elif img.shape[-1] != out_size:
        img = F.interpolate(img, size=(out_size, out_size), mode="bicubic", align_corners=False)
    img = img.clamp(0, 1)
    return (img - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


# ----------------------------------------------------------------------------------------------------------------
# Model, loss, evaluation
# ----------------------------------------------------------------------------------------------------------------

def load_model_config(path: Path) -> tuple[str, dict]:
    cfg = json.loads(path.read_text())
    return path.stem, cfg


def create_model(config_path: Path, seed: int) -> torch.nn.Module:
    import open_clip

    open_clip.add_model_config(config_path)
    torch.manual_seed(seed)
    return open_clip.create_model(config_path.stem, pretrained=None)


def encode_text_trimmed(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's ``encode_text`` without the padding after the last end-of-text token.

    Exact under the causal mask (no position attends to later ones), and several times cheaper for captions of
    10-20 tokens in a 32-token context. Returns ``[B, D]`` unnormalised.
    """
    eot = tokens.argmax(dim=-1)
    length = int(eot.max()) + 1
    x = model.token_embedding(tokens[:, :length]) + model.positional_embedding[:length]
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0]), eot]
    return x @ model.text_projection


def clip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of matched pairs; ``img``, ``txt``: ``[B, D]`` normalised."""
    logits = logit_scale * img @ txt.T
    target = torch.arange(img.shape[0])
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


@torch.no_grad()
def retrieval(model: torch.nn.Module, images: torch.Tensor, recolor: torch.Tensor, captions: list[str],
              tokenizer, size: int, mean: torch.Tensor, std: torch.Tensor, batch: int = 256) -> dict:
    """Image -> text retrieval among the held-out items' distinct canonical captions (top-1 and top-5, %)."""
    model.eval()
    distinct = sorted(set(captions))
    index = {c: i for i, c in enumerate(distinct)}
    target = torch.tensor([index[c] for c in captions])
    txt = torch.cat([F.normalize(encode_text_trimmed(model, tokenizer(distinct[i:i + batch])), dim=-1)
                     for i in range(0, len(distinct), batch)])
    feats = []
    for i in range(0, len(images), batch):
        x = augment(images[i:i + batch], recolor[i:i + batch], size, AugmentConfig(), None, mean, std, train=False)
        feats.append(F.normalize(model.encode_image(x), dim=-1))
    sims = torch.cat(feats) @ txt.T
    top = sims.topk(min(5, len(distinct)), dim=-1).indices
    model.train()
    return {"i2t_top1": 100.0 * float((top[:, 0] == target).float().mean()),
            "i2t_top5": 100.0 * float((top == target[:, None]).any(dim=1).float().mean()),
            "n_images": len(captions), "n_captions": len(distinct)}


def cosine_lr(step: int, total: int, warmup: int, base: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * base * (1 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints (safetensors + JSON, no pickles)
# ----------------------------------------------------------------------------------------------------------------

def save_checkpoint(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    from safetensors.torch import save_file

    names = {id(p): n for n, p in model.named_parameters()}
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    steps = {}
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p)
            if st:
                tensors[f"opt.{names[id(p)]}.exp_avg"] = st["exp_avg"].contiguous()
                tensors[f"opt.{names[id(p)]}.exp_avg_sq"] = st["exp_avg_sq"].contiguous()
                steps[names[id(p)]] = float(st["step"])
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(path)
    path.with_suffix(".json").write_text(json.dumps({**state, "opt_steps": steps}))


def canonical_header(path: Path) -> None:
    """Rewrite a safetensors file's header with its ``__metadata__`` keys in sorted order, in place.

    safetensors writes the metadata map in no fixed order (two runs writing the same tensors could give files with
    different sha256); sorted, the same weights always give the same bytes, so a retraining can be checked by the
    file's hash. The tensors' entries, their offsets and the header's length are unchanged.
    """
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    if len(text) > n:
        raise ValueError(f"{path}: the re-serialised header ({len(text)} bytes) is longer than the original ({n})")
    raw[8 : 8 + n] = text + b" " * (n - len(text))  # safetensors pads its header with spaces
    path.write_bytes(bytes(raw))


def load_checkpoint(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    state = json.loads(path.with_suffix(".json").read_text())
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    for n, p in model.named_parameters():
        if f"opt.{n}.exp_avg" in tensors:
            opt.state[p] = {"step": torch.tensor(state["opt_steps"][n]), "exp_avg": tensors[f"opt.{n}.exp_avg"],
                            "exp_avg_sq": tensors[f"opt.{n}.exp_avg_sq"]}
    return state


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------

def holdout_mask(items: Sequence[Item], fraction: float, seed: int) -> np.ndarray:
    """A seeded held-out split by item key (stable when items are added or removed)."""
    h = np.array([int.from_bytes(hashlib.sha256(f"{seed}|{it.key}".encode()).digest()[:8], "little")
                  for it in items], dtype=np.float64)
    return h / 2**64 < fraction


def tokenize_captions(items: Sequence[Item], tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """All caption variants as ``[T, L]`` token ids, and ``[N + 1]`` offsets of each item's variants."""
    flat = [c for it in items for c in it.captions]
    tokens = torch.cat([tokenizer(flat[i:i + 4096]) for i in range(0, len(flat), 4096)])
    offsets = torch.tensor(np.cumsum([0] + [len(it.captions) for it in items]), dtype=torch.int64)
    return tokens, offsets


def parse_args(argv: Iterable[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sources", default="openclipart,emoji,glyphs",
                   help="comma-separated: openclipart, emoji, glyphs, csv:PATH (columns path,caption)")
    p.add_argument("--model-config", type=Path, default=CONFIG_DIR / "fewclip-mini.json",
                   help="open_clip model config JSON (its file stem is the model name)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup", type=float, default=0.05, help="fraction of the steps with a linear warm-up")
    p.add_argument("--holdout", type=float, default=0.05, help="held-out fraction for retrieval accuracy")
    p.add_argument("--max-per-folder", type=int, default=200,
                   help="Openclipart folders with more drawings keep a seeded sample of this many")
    p.add_argument("--stop-after-epoch", type=int, default=0,
                   help="end training after this many epochs of the --epochs schedule (0: all of them), e.g. to "
                        "free the machine; running the same command again without it resumes the checkpoint of "
                        "the same schedule and continues it exactly")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: all); for trials")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--workers", type=int, default=2, help="processes that render the array cache")
    p.add_argument("--cache-dir", type=Path, default=REPO / ".fewclip_cache" / "mini_clip",
                   help="array cache and checkpoints (not part of the repository)")
    p.add_argument("--out", type=Path, default=CONFIG_DIR / "fewclip-mini.safetensors",
                   help="fp16 weights; the training log goes next to it as <stem>.train.json")
    p.add_argument("--no-resume", action="store_true", help="ignore a checkpoint of an interrupted run")
    return p.parse_args(argv)


def main(argv: Iterable[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import open_clip
    from safetensors.torch import save_file

    wall0, cpu0 = time.perf_counter(), time.process_time()
    name, mcfg = load_model_config(args.model_config)
    size = int(mcfg["vision_cfg"]["image_size"])
    sources = [s for s in args.sources.split(",") if s]
    items = collect_items(sources, args.seed, args.max_per_folder)
    images_np, items = build_cache(items, size, args.cache_dir, args.seed, args.workers)
    prep_wall = time.perf_counter() - wall0
    held = holdout_mask(items, args.holdout, args.seed)
    train_idx, held_idx = np.flatnonzero(~held), np.flatnonzero(held)
    counts = {s: {"train": int(sum(items[i].source == s for i in train_idx)),
                  "held_out": int(sum(items[i].source == s for i in held_idx))} for s in sorted({it.source
                                                                                                for it in items})}
    log.info("data: %s", counts)

    model = create_model(args.model_config, args.seed)
    model.train()
    tokenizer = open_clip.get_tokenizer(name)
    pcfg = open_clip.model.get_model_preprocess_cfg(model)
    mean, std = torch.tensor(pcfg["mean"]), torch.tensor(pcfg["std"])
    tokens, offsets = tokenize_captions(items, tokenizer)
    images = torch.from_numpy(images_np)
    recolor = torch.tensor([it.recolor for it in items])
    held_t = torch.from_numpy(held_idx)
    held_captions = [items[i].captions[0] for i in held_idx]

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    steps_per_epoch = len(train_idx) // args.batch_size
    total = steps_per_epoch * args.epochs
    if args.max_steps:
        total = min(total, args.max_steps)
    warmup = max(1, int(args.warmup * total))
    aug = AugmentConfig()
    run_spec = {"model": name, "model_config": mcfg, "sources": sources, "epochs": args.epochs,
                "batch_size": args.batch_size, "lr": args.lr, "weight_decay": args.weight_decay, "warmup": warmup,
                "total_steps": total, "holdout": args.holdout, "max_per_folder": args.max_per_folder,
                "seed": args.seed, "threads": args.threads, "augment": asdict(aug), "data_version": DATA_VERSION,
                "preprocess": {"size": size, "mean": pcfg["mean"], "std": pcfg["std"]}}
    spec_hash = hashlib.sha256(json.dumps(run_spec, sort_keys=True).encode()).hexdigest()[:16]
    ckpt = args.cache_dir / f"checkpoint-{name}-{spec_hash}.safetensors"
    history: list[dict] = []
    start_epoch, step, prev_wall, prev_cpu = 0, 0, 0.0, 0.0
    if ckpt.is_file() and not args.no_resume:
        state = load_checkpoint(ckpt, model, opt)
        start_epoch, step, history = state["epoch"], state["step"], state["history"]
        prev_wall, prev_cpu = state["wall_s"], state["cpu_s"]
        log.info("resuming %s at epoch %d (step %d)", ckpt, start_epoch, step)
    log.info("model %s: %.2fM parameters; %d train / %d held-out items; %d steps of %d (%d per epoch)",
             name, sum(p.numel() for p in model.parameters()) / 1e6, len(train_idx), len(held_idx), total,
             args.batch_size, steps_per_epoch)
    t_wall, t_cpu = time.perf_counter(), time.process_time()
    if not history:
        history.append({"epoch": 0, **retrieval(model, images[held_t], recolor[held_t], held_captions, tokenizer,
                                                size, mean, std)})
        log.info("epoch 0 (init): held-out i2t top1 %.2f%% top5 %.2f%%", history[0]["i2t_top1"],
                 history[0]["i2t_top5"])
    max_scale = math.log(100.0)
    for epoch in range(start_epoch, args.epochs):
        if step >= total or (args.stop_after_epoch and epoch >= args.stop_after_epoch):
            break
        gen = torch.Generator().manual_seed(args.seed * 100_003 + epoch)
        order = torch.from_numpy(train_idx)[torch.randperm(len(train_idx), generator=gen)]
        losses = []
        for b in range(steps_per_epoch):
            if step >= total:
                break
            idx = order[b * args.batch_size:(b + 1) * args.batch_size]
            pick = offsets[idx] + (torch.rand(len(idx), generator=gen) * (offsets[idx + 1] - offsets[idx])).long()
            x = augment(images[idx], recolor[idx], size, aug, gen, mean, std)
            lr = cosine_lr(step, total, warmup, args.lr)
            for g in opt.param_groups:
                g["lr"] = lr
            img = F.normalize(model.encode_image(x), dim=-1)
            txt = F.normalize(encode_text_trimmed(model, tokens[pick]), dim=-1)
            loss = clip_loss(img, txt, model.logit_scale.exp())
            if not torch.isfinite(loss):
                raise SystemExit(f"non-finite loss at step {step} (epoch {epoch + 1}); lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, max_scale)
            losses.append(loss.item())
            step += 1
            if b % 20 == 0:
                log.info("epoch %d step %d/%d loss %.3f lr %.2e", epoch + 1, b, steps_per_epoch, losses[-1], lr)
        ret = retrieval(model, images[held_t], recolor[held_t], held_captions, tokenizer, size, mean, std)
        wall = prev_wall + time.perf_counter() - t_wall
        cpu = prev_cpu + time.process_time() - t_cpu
        history.append({"epoch": epoch + 1, "step": step, "loss": float(np.mean(losses)),
                        "temperature": float(1.0 / model.logit_scale.detach().exp()),
                        "logit_scale": float(model.logit_scale.detach().exp()), **ret, "wall_s": round(wall, 1),
                        "cpu_s": round(cpu, 1), "loadavg_1m": os.getloadavg()[0]})
        log.info("epoch %d: loss %.3f  temperature %.4f  held-out i2t top1 %.2f%% top5 %.2f%%  (%.0f s wall, "
                 "%.0f s CPU, load %.1f)", epoch + 1, history[-1]["loss"], history[-1]["temperature"],
                 ret["i2t_top1"], ret["i2t_top5"], wall, cpu, os.getloadavg()[0])
        save_checkpoint(ckpt, model, opt, {"epoch": epoch + 1, "step": step, "history": history, "wall_s": wall,
                                           "cpu_s": cpu, "spec": run_spec})

    args.out.parent.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    tmp = args.out.with_name(args.out.name + ".tmp")
    save_file(weights, str(tmp), metadata={"format": "pt", "model": name})
    canonical_header(tmp)
    tmp.replace(args.out)
    wall_total = prev_wall + time.perf_counter() - t_wall
    report = {"spec": run_spec, "stopped_after_epoch": history[-1]["epoch"], "data_counts": counts,
              "n_items": len(items), "history": history,
              "prepare_wall_s": round(prep_wall, 1), "train_wall_s": round(wall_total, 1),
              "train_cpu_s": round(prev_cpu + time.process_time() - t_cpu, 1),
              "total_wall_s": round(time.perf_counter() - wall0, 1),
              "total_cpu_s_this_process": round(time.process_time() - cpu0, 1),
              "weights": {"file": args.out.name, "bytes": args.out.stat().st_size,
                          "sha256": hashlib.sha256(args.out.read_bytes()).hexdigest()},
              "versions": {"torch": torch.__version__, "open_clip": open_clip.__version__,
                           "python": sys.version.split()[0]},
              "command": "python scripts/train_mini_clip.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    args.out.with_name(args.out.stem + ".train.json").write_text(json.dumps(report, indent=1) + "\n")
    log.info("wrote %s (%.1f MB); training %.0f s wall, %.0f s CPU", args.out, args.out.stat().st_size / 1e6,
             report["train_wall_s"], report["train_cpu_s"])
    return 0


if __name__ == "__main__":
    # the script's log goes to stderr; a caller of main() (a test, another script) keeps its own logging setup
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    raise SystemExit(main())
