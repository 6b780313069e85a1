"""Helpers shared by the test suites: servers on loopback, models, images, fakes."""
