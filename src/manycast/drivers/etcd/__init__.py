"""The pool's state in etcd (`[pool] coordination = "etcd"`): the I/O side of the
leased coordination (`protocol.leased`).

    client.py    etcd's v3 JSON gateway over httpx: leases, ranges, transactions, watches
    session.py   one server's lease, view of the pool's keys, and transactions
    sessions.py  the sessions of the servers a process hosts, on the overlay's loop
"""

from manycast.drivers.etcd.client import EtcdClient, EtcdError, LeaseNotFound
from manycast.drivers.etcd.session import EtcdSession
from manycast.drivers.etcd.sessions import EtcdSessions, key_prefix

__all__ = ["EtcdClient", "EtcdError", "EtcdSession", "EtcdSessions", "LeaseNotFound", "key_prefix"]
