"""The gateways as AMWA NMOS Nodes: the server gateway a USB Sender, the client gateway a
USB Receiver (IS-04 Node API, IS-05 Connection API, registration; docs/nmos.md).

`model`, `sdp` and `connection` are pure; `api` answers requests without sockets;
`node` and `registration` run them beside a gateway.
"""
