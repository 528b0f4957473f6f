from __future__ import annotations

import base64

import pytest
from decoder_inputs import qr_png

from quishguard.decoders import html as html_module
from quishguard.decoders.html import analyse_html, decode_data_uri

LOCATION = "message > part 1 (text/html)"


def analyse(markup: str, **options):
    return analyse_html(markup, LOCATION, is_attachment=False, **options)


def test_html_anchor_links_with_text():
    analysis = analyse(
        '<a href="https://example.com/a">Open <b>invoice</b></a>'
        '<a href="#top">top</a><a href="javascript:void(0)">js</a><a href="cid:x">c</a>'
        '<map><area href="https://example.com/area"></map>'
    )

    assert [(link.url, link.source, link.text) for link in analysis.links] == [
        ("https://example.com/a", "html-href", "Open invoice"),
        ("https://example.com/area", "html-href", ""),
    ]
    assert analysis.links[0].location == LOCATION


@pytest.mark.parametrize(
    ("action", "offsite"),
    [
        ("https://collect.example.net/post.php", True),
        ("HTTP://collect.example.net/", True),
        ("//collect.example.net/p", True),
        ("/relative/post", False),
        ("", False),
        ("mailto:x@example.com", False),
    ],
)
def test_html_offsite_form_detection(action, offsite):
    analysis = analyse(f'<form action="{action}" method="post"><input type="password"></form>')

    assert bool(analysis.facts.offsite_forms) is offsite
    assert any(link.source == "html-form" for link in analysis.links) is offsite


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("0;url=https://example.net/next", "https://example.net/next"),
        ("0; URL='https://example.net/q'", "https://example.net/q"),
        ("5 , url=https://example.net/slow", "https://example.net/slow"),
        ("3", None),
    ],
)
def test_html_meta_refresh_targets(content, expected):
    analysis = analyse(f'<head><meta http-equiv="Refresh" content="{content}"></head><p>x</p>')

    if expected is None:
        assert analysis.facts.meta_refresh == ()
        assert analysis.links == []
    else:
        assert analysis.facts.meta_refresh == (expected,)
        assert [(link.url, link.source) for link in analysis.links] == [(expected, "html-meta-refresh")]


def test_html_meta_without_refresh_ignored():
    analysis = analyse('<meta http-equiv="content-type" content="text/html; url=https://example.net/x">')

    assert analysis.facts.meta_refresh == ()


@pytest.mark.parametrize(
    "script",
    [
        'location = "https://example.net/r";',
        "window.location='https://example.net/r'",
        'window.location.href = "https://example.net/r";',
        'document.location.href="https://example.net/r"',
        'location.replace("https://example.net/r")',
        "window.location.assign('https://example.net/r')",
        'top.location["href"] = "https://example.net/r"',
        'document.location = "https:\\/\\/example.net\\/r"',
    ],
)
def test_html_js_redirect_literal(script):
    analysis = analyse(f"<script>{script}</script>")

    assert analysis.facts.js_redirects == ("https://example.net/r",)
    assert [(link.url, link.source) for link in analysis.links] == [("https://example.net/r", "html-script")]
    assert analysis.facts.has_script is True


def test_html_js_redirect_expression_no_link():
    analysis = analyse("<script>var u = atob('aHR0cHM6Ly9leGFtcGxlLm5ldA=='); window.location.href = u + '#' ;</script>")

    assert analysis.facts.js_redirects == ("u + '#'",)
    assert analysis.links == []
    assert analysis.facts.uses_atob is True


@pytest.mark.parametrize(
    "script",
    [
        'if (location.href == "https://example.net/") {}',
        "var f = (location) => location;",
        "console.log(location.hostname);",
        "var relocation = 1;",
    ],
)
def test_html_js_non_redirects_ignored(script):
    analysis = analyse(f"<script>{script}</script>")

    assert analysis.facts.js_redirects == ()


def test_html_event_attribute_redirect():
    analysis = analyse('<body onload="window.location=\'https://example.net/onload\'"><p>hi</p></body>')

    assert analysis.facts.js_redirects == ("https://example.net/onload",)
    assert analysis.facts.has_script is False


def test_html_javascript_href_redirect():
    analysis = analyse("<a href=\"javascript:location.assign('https://example.net/js')\">go</a>")

    assert analysis.facts.js_redirects == ("https://example.net/js",)
    assert [link.source for link in analysis.links] == ["html-script"]


def test_html_atob_absent():
    analysis = analyse("<script>var notatob = 1; btoa('x');</script>")

    assert analysis.facts.uses_atob is False


@pytest.mark.parametrize(
    ("markup", "marker"),
    [
        ('<script src="https://challenges.cloudflare.com/turnstile/v0/api.js"></script>', "challenges.cloudflare.com/turnstile"),
        ('<div class="cf-turnstile" data-sitekey="k"></div>', "cf-turnstile"),
        ('<script src="https://js.hcaptcha.com/1/api.js" async></script>', "hcaptcha.com/1/api.js"),
        ('<div class="h-captcha" data-sitekey="k"></div>', "h-captcha"),
        ('<script src="https://www.google.com/recaptcha/api.js"></script>', "google.com/recaptcha"),
        ('<div class="g-recaptcha"></div>', "g-recaptcha"),
        ("<script>grecaptcha.ready(function(){})</script>", "grecaptcha"),
        ("<p>Please verify you are human to continue</p>", "verify you are human"),
        ("<p>I&#8217;m not a robot</p>", "i'm not a robot"),
        ("<h1>Human Verification</h1>", "human verification"),
        ("<p>Complete the security check to access the document</p>", "complete the security check"),
    ],
)
def test_html_captcha_marker_present(markup, marker):
    analysis = analyse(markup)

    assert marker in analysis.facts.captcha_markers


def test_html_captcha_markers_absent():
    analysis = analyse('<p>Your order has shipped.</p><a href="https://example.com/track">Track</a>')

    assert analysis.facts.captcha_markers == ()
    assert analysis.facts.js_redirects == ()
    assert analysis.facts.offsite_forms == ()
    assert analysis.facts.meta_refresh == ()
    assert analysis.facts.uses_atob is False
    assert analysis.facts.has_script is False


def test_html_visible_text_excludes_hidden():
    markup = (
        "<html><head><title>Title text</title><style>p{color:red}</style></head><body>"
        "<p>Shown</p><div style='display: none'>secret padding</div><span hidden>more</span>"
        "<p style='visibility:hidden'>ghost</p><script>var s = 'script text';</script>"
        "<noscript>Enable</noscript></body></html>"
    )
    analysis = analyse(markup)

    assert analysis.visible_text == "Shown Enable"
    assert analysis.facts.visible_text_chars == len("ShownEnable")


def test_html_image_count_and_cids():
    analysis = analyse(
        '<img src="cid:Logo@Example.com"><img src="https://example.com/t.gif">'
        "<td style=\"background:url('cid:bg%40example.com')\">x</td>"
    )

    assert analysis.facts.image_count == 2
    assert analysis.cid_references == {"logo@example.com", "bg@example.com"}


def test_html_embedded_image_cap():
    b64 = base64.b64encode(qr_png()).decode("ascii")
    markup = "".join(f'<img src="data:image/png;base64,{b64}">' for _ in range(5))
    analysis = analyse(markup, max_embedded_images=2)

    assert len(analysis.embedded_images) == 2


def test_html_oversized_markup_limit(monkeypatch):
    monkeypatch.setattr(html_module, "MAX_HTML_CHARS", 100)
    analysis = analyse("<p>" + "x" * 500 + "</p>")

    assert [problem.kind for problem in analysis.problems] == ["limit"]
    assert analysis.facts.visible_text_chars <= 100


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("data:text/plain;base64,aGVsbG8=", b"hello"),
        ("data:;base64,aGVs\n bG8", b"hello"),
        ("DATA:image/png;BASE64,aGVsbG8%3D", b"hello"),
        ("data:,hello%20world", b"hello world"),
        ("https://example.com/x.png", None),
    ],
)
def test_decode_data_uri_cases(uri, expected):
    assert decode_data_uri(uri) == expected


def test_html_srcset_with_data_uri_commas():
    b64 = base64.b64encode(qr_png()).decode("ascii")
    analysis = analyse(f'<img srcset="https://example.com/a.png 1x, data:image/png;base64,{b64} 2x">')

    assert [image.data for image in analysis.embedded_images] == [qr_png()]


def test_html_repeated_redirects_capped():
    markup = "".join(f"<p onclick=\"location='https://example.net/{n % 50}'\">t</p>" for n in range(500))
    analysis = analyse(markup)

    assert len(analysis.facts.js_redirects) == html_module.MAX_VALUES_PER_FACT
    assert analysis.facts.js_redirects[0] == "https://example.net/0"


def test_html_deep_nesting_stays_linear():
    # A per-element search of the subtree would make this quadratic.
    analysis = analyse("<div>" * 20000 + "deep" + "</div>" * 20000)

    assert analysis.visible_text == "deep"


def test_html_unclosed_css_urls_fast():
    analysis = analyse("<style>" + "url(" * 100000 + "</style><p>x</p>")

    assert analysis.embedded_images == []
    assert analysis.visible_text == "x"


def test_html_saferedirecturl_collected():
    result = analyse('<a href="https://shop.example.test/" data-saferedirecturl="https://www.google.com/url?'
                     'q=https://shop.example.test/&amp;source=gmail">Shop</a>')

    assert ("https://www.google.com/url?q=https://shop.example.test/&source=gmail", "html-saferedirecturl") in [
        (link.url, link.source) for link in result.links]


def test_html_visible_text_urls_collected():
    result = analyse('<p>Open https://portal.example.test/sign-in. Thanks</p>'
                     '<p style="display:none">https://hidden.example.test/</p>')

    assert [(link.url, link.source) for link in result.links] == [("https://portal.example.test/sign-in", "html-text")]
