def create_model(): pass
def list_models(): pass
def load_upstream_checkpoint(): pass
