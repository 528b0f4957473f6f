"""quishguard: an inline mail filter for QR-code phishing, CAPTCHA-gated redirects and Direct Send spoofing."""

__version__ = "0.1.0"
