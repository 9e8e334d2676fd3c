"""Surfaces and Connectome Workbench files: GIFTI metrics/surfaces, CIFTI-2 dense scalars, spec files."""
