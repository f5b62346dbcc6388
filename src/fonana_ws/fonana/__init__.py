"""Fonana's domain: who may join which channel, the events and how each is delivered, the publisher."""
