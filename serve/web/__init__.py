"""The phone-browser demo: a static page that runs a bundle with LiteRT.js, and the server behind it."""
