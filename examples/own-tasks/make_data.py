"""Write the worked example's two CSV files (made by this script; no outside data, Apache-2.0 as
the project):

* ``products.csv``: ``title,category``: 240 product titles of invented brands in a 6-category
  taxonomy (a product-title -> category task, output ``label``);
* ``attributes.csv``: ``title,attributes``: 200 titles with the attributes they state as JSON
  (brand, colours, materials, size when given: an attribute-extraction task, output ``json``).

    python examples/own-tasks/make_data.py        # (re)writes both files next to this script

Titles vary in layout (brand first or last, separators, attribute order), so the tasks need the
words, not the position. Deterministic (seeded): the committed files are what it writes.
"""
from __future__ import annotations

import csv
import json
import random
from pathlib import Path

HERE = Path(__file__).parent
BRANDS = ["Veltra", "Nordhaven", "Kestrel", "Bluefin", "Oakridge", "Lumora", "Tidewell", "Ferro",
          "Pinecrest", "Solvane", "Marlowe", "Quillon", "Arbor & Finch", "Halden", "Zephyra"]
COLORS = ["black", "white", "silver", "navy blue", "forest green", "red", "grey", "rose gold",
          "beige", "yellow", "teal", "charcoal"]
# category -> (product type, materials it may be made of, sizes it may come in)
CATALOG = {
    "Electronics": [
        ("Wireless Earbuds", [], []), ("USB-C Wall Charger", [], ["20W", "45W", "65W"]),
        ("Bluetooth Speaker", ["fabric", "aluminium"], ["10W", "20W"]),
        ("HDMI Cable", ["braided nylon"], ["1 m", "2 m", "3 m"]),
        ("Power Bank", ["aluminium"], ["10000mAh", "20000mAh"]),
        ("Mechanical Keyboard", ["aluminium", "ABS plastic"], []),
        ("HD Webcam", [], ["1080p", "4K"]), ("Smart Watch", ["silicone", "stainless steel"], ["41 mm", "45 mm"]),
    ],
    "Grocery": [
        ("Organic Rolled Oats", [], ["500 g", "1 kg"]), ("Extra Virgin Olive Oil", [], ["500 ml", "1 L"]),
        ("Dark Chocolate Bar 70%", [], ["100 g"]), ("Green Tea Bags", [], ["20 count", "100 count"]),
        ("Basmati Rice", [], ["1 kg", "5 kg"]), ("Crunchy Peanut Butter", [], ["340 g", "1 kg"]),
        ("Espresso Coffee Beans", [], ["250 g", "1 kg"]), ("Wildflower Honey", [], ["250 g", "500 g"]),
    ],
    "Home & Kitchen": [
        ("Nonstick Frying Pan", ["aluminium", "cast iron"], ["24 cm", "28 cm"]),
        ("Electric Kettle", ["stainless steel", "glass"], ["1.7 L"]),
        ("Cutting Board", ["bamboo", "oak wood"], ["large", "medium"]),
        ("Food Storage Containers", ["glass", "BPA-free plastic"], ["set of 5", "set of 10"]),
        ("Bath Towels", ["cotton", "linen"], ["set of 2", "set of 4"]),
        ("Memory Foam Pillow", ["memory foam"], ["standard", "king"]),
        ("Chef's Knife", ["stainless steel", "carbon steel"], ["20 cm"]),
    ],
    "Beauty & Personal Care": [
        ("Vitamin C Face Serum", [], ["30 ml"]), ("Hydrating Face Cream", [], ["50 ml"]),
        ("Sulfate-Free Shampoo", [], ["250 ml", "500 ml"]), ("Mineral Sunscreen SPF 50", [], ["100 ml"]),
        ("Tinted Lip Balm", [], ["4.5 g"]), ("Electric Toothbrush", [], []),
        ("Hair Dryer", ["ceramic"], ["1800W", "2200W"]),
    ],
    "Toys & Games": [
        ("Building Blocks Set", ["ABS plastic"], ["500 pieces", "1000 pieces"]),
        ("Jigsaw Puzzle", ["cardboard"], ["500 pieces", "1000 pieces"]),
        ("Remote Control Car", ["plastic"], ["1:16 scale", "1:24 scale"]),
        ("Plush Teddy Bear", ["polyester"], ["30 cm", "50 cm"]),
        ("Wooden Train Set", ["beech wood"], ["40 pieces"]), ("Family Board Game", [], []),
    ],
    "Sports & Outdoors": [
        ("Yoga Mat", ["TPE", "natural rubber"], ["6 mm", "8 mm"]),
        ("Insulated Water Bottle", ["stainless steel"], ["500 ml", "750 ml", "1 L"]),
        ("Trail Running Shoes", ["mesh"], ["size 42", "size 44"]),
        ("Camping Tent", ["polyester", "nylon"], ["2-person", "4-person"]),
        ("Resistance Bands", ["latex"], ["set of 5"]),
        ("Hiking Backpack", ["ripstop nylon"], ["30 L", "45 L"]),
    ],
}


def title_of(rng: random.Random, brand: str, kind: str, colors: list[str], materials: list[str],
             size: str | None) -> str:
    """One of several title layouts shops use."""
    color = "/".join(colors)
    material = " and ".join(materials)
    material = " ".join(w[:1].upper() + w[1:] for w in material.split())  # (ABS stays ABS)
    parts = [p for p in (material, kind) if p]
    core = " ".join(parts)
    extras = [x for x in (size, color) if x]
    rng.shuffle(extras)
    layout = rng.randrange(4)
    if layout == 0:
        return ", ".join([f"{brand} {core}", *extras])
    if layout == 1:
        return f"{core} by {brand}" + (f" - {', '.join(extras)}" if extras else "")
    if layout == 2:
        return f"{brand} {core}" + (f" ({', '.join(extras)})" if extras else "")
    return " | ".join([" ".join([*extras, core]) if extras else core, brand])


def product(rng: random.Random) -> tuple[str, str, dict]:
    category = rng.choice(sorted(CATALOG))
    kind, mats, sizes = rng.choice(CATALOG[category])
    brand = rng.choice(BRANDS)
    colors = rng.sample(COLORS, k=rng.choice([0, 1, 1, 1, 2]))
    materials = rng.sample(mats, k=min(len(mats), rng.choice([0, 1, 1]))) if mats else []
    size = rng.choice(sizes) if sizes and rng.random() < 0.8 else None
    attrs: dict = {"brand": brand, "colors": colors, "materials": [m.lower() for m in materials]}
    if size:
        attrs["size"] = size
    return title_of(rng, brand, kind, colors, materials, size), category, attrs


def main() -> None:
    rng = random.Random(20261207)
    seen: set[str] = set()
    rows = []
    while len(rows) < 440:
        title, category, attrs = product(rng)
        if title not in seen:
            seen.add(title)
            rows.append((title, category, attrs))
    with open(HERE / "products.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["title", "category"])
        w.writerows((t, c) for t, c, _ in rows[:240])
    with open(HERE / "attributes.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["title", "attributes"])
        w.writerows((t, json.dumps(a, ensure_ascii=False)) for t, _, a in rows[240:])
    print(f"wrote {HERE / 'products.csv'} (240 rows) and {HERE / 'attributes.csv'} (200 rows)")


if __name__ == "__main__":
    main()
