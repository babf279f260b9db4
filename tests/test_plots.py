import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from shared import plots  # noqa: E402


def test_tokens_html_keeps_text_and_alternates_colours():
    html = plots.tokens_html(["Hello", " <world>", "\n"])
    assert "&lt;world&gt;" in html and "\u21b5<br>" in html
    assert html.count("<span") == 3
    first, second = plots.TOKEN_COLORS[:2]
    assert html.index(first) < html.index(second)


def test_heatmap_annotates_every_cell():
    fig, ax = plt.subplots()
    plots.heatmap(ax, [[0.1, 0.9], [0.5, 0.5]], ["a", "b"], ["c", "d"])
    assert [t.get_text() for t in ax.texts] == ["0.10", "0.90", "0.50", "0.50"]
    plt.close(fig)
