"""rtkit.datasets: the procedural sample world and identity-folder datasets (DigiFace layout:
one folder per identity), shared by training, the runtime and evaluation."""
