"""Coverage-guided fuzzing of the USB/IP codec (atheris); see docs/fuzzing.md."""
