"""A small, redistributable sample image set, generated from the photos scikit-learn ships (CC BY 2.0).

scikit-learn installs with fastai, so the set needs no download: crops of `china.jpg` become the class
"temple", crops of `flower.jpg` the class "flower". `write_sample_folder` adds the junk a real scrape holds
(exact and near copies, a truncated JPEG, an HTML page named .jpg, an empty file) so every cleaning stage
has something to find.
"""
from __future__ import annotations

import io
import random
from pathlib import Path

from PIL import Image, ImageEnhance, ImageOps

PHOTOS = {"temple": "china.jpg", "flower": "flower.jpg"}
ATTRIBUTION = (
    "Sample images are crops of china.jpg and flower.jpg as bundled with scikit-learn "
    "(sklearn/datasets/images), CC BY 2.0 (https://creativecommons.org/licenses/by/2.0/), "
    "photos by danielbuechele and vultilion on Flickr."
)


def load_photo(name: str) -> Image.Image:
    from importlib.resources import files

    with (files("sklearn.datasets") / "images" / name).open("rb") as fh:
        return Image.open(fh).convert("RGB")


def random_crop(photo: Image.Image, size: tuple[int, int], rng: random.Random) -> Image.Image:
    """A natural-looking variant: random crop (25-80% of the photo), flip, colour jitter, resized to size."""
    w, h = photo.size
    scale = rng.uniform(0.25, 0.8)
    cw, ch = int(w * scale), int(h * scale)
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    img = photo.crop((x, y, x + cw, y + ch)).resize(size, Image.Resampling.BILINEAR)
    if rng.random() < 0.5:
        img = ImageOps.mirror(img)
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.8, 1.2))
    return ImageEnhance.Color(img).enhance(rng.uniform(0.7, 1.3))


def jpeg_bytes(img: Image.Image, quality: int = 88) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def write_sample_folder(out: Path, per_class: int = 24, size: tuple[int, int] = (160, 120), seed: int = 0) -> dict:
    """Write out/<label>/*.jpg plus realistic junk; returns what was planted, for checks and docs."""
    rng = random.Random(seed)
    planted: dict = {"images": 0, "exact_copies": 0, "near_copies": 0, "junk": 0}
    for label, photo_name in PHOTOS.items():
        folder = out / label
        folder.mkdir(parents=True, exist_ok=True)
        photo = load_photo(photo_name)
        crops = [random_crop(photo, size, rng) for _ in range(per_class)]
        for i, img in enumerate(crops):
            (folder / f"{label}_{i:03d}.jpg").write_bytes(jpeg_bytes(img))
        planted["images"] += per_class
        (folder / "copy_of_000.jpg").write_bytes((folder / f"{label}_000.jpg").read_bytes())
        planted["exact_copies"] += 1
        (folder / "resized_001.jpg").write_bytes(jpeg_bytes(crops[1].resize((size[0] * 2, size[1] * 2)), 75))
        ImageOps.mirror(crops[2]).save(folder / "mirrored_002.png")
        planted["near_copies"] += 2
        (folder / "truncated.jpg").write_bytes(jpeg_bytes(crops[3])[:1500])
        (folder / "error_page.jpg").write_bytes(b"<!doctype html><html><body>403 Forbidden</body></html>")
        (folder / "empty.jpg").write_bytes(b"")
        planted["junk"] += 3
    return planted


def write_web_jpegs(out: Path, count: int, size: tuple[int, int] = (640, 480), seed: int = 0) -> list[Path]:
    """count distinct web-sized JPEGs (benchmarks): crops of both photos at full resolution."""
    rng = random.Random(seed)
    photos = [load_photo(name) for name in PHOTOS.values()]
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = out / f"img_{i:06d}.jpg"
        path.write_bytes(jpeg_bytes(random_crop(photos[i % 2], size, rng), quality=rng.randint(80, 92)))
        paths.append(path)
    return paths


def write_sample_site(root: Path, sample: Path) -> list[str]:
    """One HTML page per class under root/ that shows every file of sample/<class>/ (junk included), as
    a small web site for the greedy crawl engine; returns the page names."""
    pages = []
    for folder in sorted(p for p in sample.iterdir() if p.is_dir()):
        images = "\n".join(f'<img src="{f.relative_to(root).as_posix()}" alt="{f.stem}">'
                            for f in sorted(folder.iterdir()))
        page = root / f"{folder.name}.html"
        page.write_text(f"<!doctype html><html><head><title>{folder.name}</title></head><body>\n"
                        f"<h1>{folder.name}</h1>\n{images}\n</body></html>\n")
        pages.append(page.name)
    return pages
