from ._common import set_device_checks, standardize_logits
from .dist import DISTLoss, dist_loss
from .dkd import DKDLoss, dkd_loss
from .kd import KDLoss, kd_loss
from .pcd import PCDLoss, pcd_loss
