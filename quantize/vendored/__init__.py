"""Code copied unchanged from other projects: see README.md here for each file's origin and licence."""
