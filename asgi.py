from app import create_app
from front import Front
app = Front(create_app())
