"""What several test modules share: real peers (Mosquitto, the daemon process, a fake
systemd), polling, tiny real models and bundles. Test modules import from here, never from
each other."""
