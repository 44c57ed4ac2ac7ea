#!/usr/bin/env python3
"""Minimal PNG line plots with the standard library only (matplotlib is not installed here).

plot.py OUT.png TITLE CSV XCOL YCOL [SHADECOL]: draws YCOL against XCOL from a CSV with a header
row; rows where SHADECOL is non-zero get a grey background (e.g. an outage). Axis ranges and a
few tick values are printed as text in the image margins with a 5x7 bitmap font.
"""
import csv, struct, sys, zlib

FONT = {  # 5x7 glyphs, rows as 5-bit masks
    '0': [14, 17, 19, 21, 25, 17, 14], '1': [4, 12, 4, 4, 4, 4, 14], '2': [14, 17, 1, 2, 4, 8, 31],
    '3': [31, 2, 4, 2, 1, 17, 14], '4': [2, 6, 10, 18, 31, 2, 2], '5': [31, 16, 30, 1, 1, 17, 14],
    '6': [6, 8, 16, 30, 17, 17, 14], '7': [31, 1, 2, 4, 8, 8, 8], '8': [14, 17, 17, 14, 17, 17, 14],
    '9': [14, 17, 17, 15, 1, 2, 12], '.': [0, 0, 0, 0, 0, 12, 12], '-': [0, 0, 0, 31, 0, 0, 0],
    ' ': [0] * 7, ':': [0, 12, 12, 0, 12, 12, 0], '/': [1, 1, 2, 4, 8, 16, 16],
    '(': [2, 4, 8, 8, 8, 4, 2], ')': [8, 4, 2, 2, 2, 4, 8], '=': [0, 0, 31, 0, 31, 0, 0],
}
for ch in 'abcdefghijklmnopqrstuvwxyz':  # lower case drawn as simple upper-case-ish boxes
    FONT.setdefault(ch, None)
UPPER = {
    'a': [14, 17, 17, 31, 17, 17, 17], 'b': [30, 17, 17, 30, 17, 17, 30], 'c': [14, 17, 16, 16, 16, 17, 14],
    'd': [30, 17, 17, 17, 17, 17, 30], 'e': [31, 16, 16, 30, 16, 16, 31], 'f': [31, 16, 16, 30, 16, 16, 16],
    'g': [14, 17, 16, 23, 17, 17, 15], 'h': [17, 17, 17, 31, 17, 17, 17], 'i': [14, 4, 4, 4, 4, 4, 14],
    'j': [7, 2, 2, 2, 2, 18, 12], 'k': [17, 18, 20, 24, 20, 18, 17], 'l': [16, 16, 16, 16, 16, 16, 31],
    'm': [17, 27, 21, 21, 17, 17, 17], 'n': [17, 17, 25, 21, 19, 17, 17], 'o': [14, 17, 17, 17, 17, 17, 14],
    'p': [30, 17, 17, 30, 16, 16, 16], 'q': [14, 17, 17, 17, 21, 18, 13], 'r': [30, 17, 17, 30, 20, 18, 17],
    's': [15, 16, 16, 14, 1, 1, 30], 't': [31, 4, 4, 4, 4, 4, 4], 'u': [17, 17, 17, 17, 17, 17, 14],
    'v': [17, 17, 17, 17, 17, 10, 4], 'w': [17, 17, 17, 21, 21, 21, 10], 'x': [17, 17, 10, 4, 10, 17, 17],
    'y': [17, 17, 10, 4, 4, 4, 4], 'z': [31, 1, 2, 4, 8, 16, 31],
}
FONT.update(UPPER)


class Canvas:
    def __init__(self, w, h):
        self.w, self.h = w, h
        self.px = bytearray(b'\xff' * (w * h * 3))

    def set(self, x, y, rgb):
        if 0 <= x < self.w and 0 <= y < self.h:
            i = (y * self.w + x) * 3
            self.px[i:i + 3] = bytes(rgb)

    def line(self, x0, y0, x1, y1, rgb):
        n = max(abs(x1 - x0), abs(y1 - y0), 1)
        for k in range(n + 1):
            self.set(round(x0 + (x1 - x0) * k / n), round(y0 + (y1 - y0) * k / n), rgb)

    def text(self, x, y, s, rgb=(0, 0, 0)):
        for ch in s.lower():
            g = FONT.get(ch) or [0] * 7
            for r, bits in enumerate(g):
                for c in range(5):
                    if bits & (16 >> c):
                        self.set(x + c, y + r, rgb)
            x += 6

    def png(self, path):
        raw = b''.join(b'\x00' + bytes(self.px[y * self.w * 3:(y + 1) * self.w * 3]) for y in range(self.h))
        def chunk(t, d):
            return struct.pack('>I', len(d)) + t + d + struct.pack('>I', zlib.crc32(t + d) & 0xffffffff)
        with open(path, 'wb') as f:
            f.write(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', self.w, self.h, 8, 2, 0, 0, 0))
                    + chunk(b'IDAT', zlib.compress(raw, 9)) + chunk(b'IEND', b''))


def plot(out, title, xs, ys, shade=None, xlabel='', ylabel=''):
    W, H, L, R, T, B = 900, 320, 60, 20, 24, 30
    c = Canvas(W, H)
    x0, x1 = min(xs), max(xs) or 1
    y1 = max(ys) * 1.05 or 1
    X = lambda v: L + int((v - x0) / ((x1 - x0) or 1) * (W - L - R))
    Y = lambda v: H - B - int(v / y1 * (H - T - B))
    if shade:
        for i, s in enumerate(shade):
            if s:
                nxt = xs[i + 1] if i + 1 < len(xs) else xs[i]
                for xx in range(X(xs[i]), X(nxt) + 1):
                    for yy in range(T, H - B):
                        c.set(xx, yy, (225, 225, 225))
    c.line(L, T, L, H - B, (0, 0, 0))
    c.line(L, H - B, W - R, H - B, (0, 0, 0))
    for k in range(5):
        v = y1 * k / 4
        c.text(2, Y(v) - 3, ('%.0f' % v)[:9])
        c.line(L - 3, Y(v), L, Y(v), (0, 0, 0))
        xv = x0 + (x1 - x0) * k / 4
        c.text(X(xv) - 10, H - B + 6, '%.0f' % xv)
    pts = list(zip(xs, ys))
    for (a, b), (p, q) in zip(pts, pts[1:]):
        c.line(X(a), Y(b), X(p), Y(q), (200, 30, 30))
    c.text(L + 4, 6, title)
    c.text(W - R - 6 * len(xlabel), H - 10, xlabel)
    c.png(out)


if __name__ == '__main__':
    out, title, path, xcol, ycol = sys.argv[1:6]
    scol = sys.argv[6] if len(sys.argv) > 6 else None
    rows = list(csv.DictReader(open(path)))
    xs = [float(r[xcol]) for r in rows]
    ys = [float(r[ycol]) for r in rows]
    sh = [float(r[scol]) != 0 for r in rows] if scol else None
    plot(out, title, xs, ys, sh, xlabel=xcol)
