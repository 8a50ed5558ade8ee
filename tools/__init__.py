"""Developer tools of the vlfast repository (not installed with the package): see tools/README.md."""
