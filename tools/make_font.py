"""Rasterizes printable ASCII of the Hack font (MIT / Bitstream Vera licence; shipped with
egui's epaint_default_fonts crate) into a 1-bit 7 x 13 bitmap font for src/plot/font.rs.

    .venv-ref/bin/python tools/make_font.py PATH/TO/Hack-Regular.ttf > src/plot/font.rs

Needs Pillow. Only run to regenerate the committed table; nothing at build or run time uses
Python.
"""
import sys

from PIL import Image, ImageDraw, ImageFont

W, H = 7, 13
font = ImageFont.truetype(sys.argv[1], 12)
ascent, _ = font.getmetrics()
rows = []
for code in range(32, 127):
    img = Image.new("L", (W, H), 0)
    d = ImageDraw.Draw(img)
    # Baseline at row 10: ascent above it, descenders below.
    d.text((0, 10 - ascent), chr(code), fill=255, font=font)
    glyph = []
    for y in range(H):
        bits = 0
        for x in range(W):
            if img.getpixel((x, y)) >= 110:
                bits |= 1 << x
        glyph.append(bits)
    rows.append((chr(code), glyph))

print("//! A 7 x 13 bitmap font of printable ASCII (32..=126), rasterized from Hack Regular")
print("//! (MIT licence; Bitstream Vera licence for the glyphs it derives from) by")
print("//! `tools/make_font.py`. Bit x of row y is pixel (x, y); the baseline is row 10.")
print()
print("/// Glyph cell width in pixels.")
print(f"pub const WIDTH: usize = {W};")
print("/// Glyph cell height in pixels.")
print(f"pub const HEIGHT: usize = {H};")
print()
print("/// One row bitmap per glyph row, for characters 32..=126.")
print(f"pub const GLYPHS: [[u8; {H}]; 95] = [")
for ch, g in rows:
    print(f"    [{', '.join(str(b) for b in g)}], // {ch!r}")
print("];")
