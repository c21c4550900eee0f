"""The node: the pipeline that runs the imaging and answer steps, the worker and the service around them."""
