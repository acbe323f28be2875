"""Box texts and what a parser must find in them: the same table checks `mm1_mlx.boxes` and the
web page's parser (apps/static/app.js), so the terminal and the page draw the same boxes.

Each case: (text, [(x1, y1, x2, y2 in 0-1000 coordinates, clamped and ordered), (start, end))]).
"""

CASES = [
    ("Send is at [120,300, 480 , 360] and Back at [ 10, 20, 30, 40 ]; tap [500, 250].",
     [((120, 300, 480, 360), (11, 31)), ((10, 20, 30, 40), (44, 62))]),
    ("[[900, 1200, 100.5, -20]]", [((100.5, 0, 900, 1000), (1, 24))]),
    ("[1,2,3,4][5,6,7,8]", [((1, 2, 3, 4), (0, 9)), ((5, 6, 7, 8), (9, 18))]),
    ("[0, 0, 1000, 1000]", [((0, 0, 1000, 1000), (0, 18))]),
    ("[\n1,\t2, 3, 4 ]", [((1, 2, 3, 4), (0, 14))]),
    ("[1, 2, 3]", []),
    ("[1, 2, 3, 4, 5]", []),
    ("[a, b, c, d]", []),
    ("(1, 2, 3, 4)", []),
    ("[1, 2, 3, 4,]", []),
    ("[1. , 2, 3, 4]", []),
    ("[+1, 2, 3, 4]", []),
    ("[1e3, 2, 3, 4]", []),
    ("", []),
]  # fmt: skip
